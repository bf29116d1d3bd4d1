//! 4- and 5-bit weights as GGUF files store them: `Q4_1` blocks (32 values `v = d·q + m`, `q`
//! in 0..16, two values a byte) and `Q4_0` blocks (`v = d·(q − 8)`, kept as `Q4_1` with
//! `m = −8·d`, which is exact: `d` comes from an `f16` and `q` has 4 bits, so `d·q` and `8·d`
//! are exact in `f32`). `Q5_0` and `Q5_1` are the same blocks with a fifth bit per value (`q`
//! in 0..32; `Q5_0`'s offset `m = −16·d`), kept as the same nibbles plus a plane of fifth bits,
//! 4 bytes a block (bit `j` is value `j`'s, ggml's `qh`). The blocks are copied from the file,
//! never requantized: the model computes with the weights the file holds, as llama.cpp does.
//!
//! `d` is kept as `f32` (the file has `f16`), one conversion less per block in the inner loop;
//! `Q4_0`'s and `Q5_0`'s offsets are not stored at all (they follow from `d`), `Q4_1`'s and
//! `Q5_1`'s `m` is an `f32` too: 20 bytes per 32 weights of `Q4_0` (the file: 18), 24 of
//! `Q5_0` (22), 24 of `Q4_1` (20), 28 of `Q5_1` (24).
//!
//! `Q4_K` (the bulk of a `Q4_K_M` file) is the same arithmetic one level down: a super-block of
//! 256 values has an `f16` scale `d` and min `dmin`, and each of its eight sub-blocks of 32 a
//! 6-bit scale `sc` and min `mn`, so a value is `(d·sc)·q − (dmin·mn)`: a `Q4_1` block with
//! `d = d·sc` and `m = −dmin·mn`, both exact in `f32` (11 bits of `f16` times 6 bits). The
//! sub-blocks are repacked at load into this module's nibble layout (ggml's low half of 32
//! bytes being one sub-block and the high half the next), and their scales are kept factored
//! as the file has them: `d` and `dmin` per super-block (as `f32`), `sc` and `mn` per sub-block
//! (a byte each), 4.75 bits a weight against the file's 4.5 (6 bits with an `f32` scale and
//! offset per sub-block, which is what this module kept before; with this and `Q6_K` kept as
//! it is (the `q6` module), `backflow generate` on the 1.5B Qwen file peaks at 1.21x the
//! file's size where it peaked at 1.53x, see the README). The kernels
//! multiply the eight sub-block scales of a super-block out in one vector instruction before
//! its eight blocks (`kernels::dot_q4`), so they give the file's values bit for bit and run
//! as fast as on per-block scales. `Q5_K` (the bulk of a `Q5_K_M` file) is `Q4_K` plus a fifth
//! bit per value, repacked the same way with its fifth bits.

use super::kernels::{self, Kernel};
use super::QK;
use crate::model::gguf::{f16_at, scale_min_k4, GgmlType, QK_K};
use rayon::prelude::*;

/// Bytes of 4-bit values per block.
pub const NIBBLE_BYTES: usize = QK / 2;

/// Bytes of fifth bits per block of 5-bit values.
pub const HIGH_BYTES: usize = QK / 8;

/// Blocks of [`QK`] values in a k-quant super-block.
pub const SUB_BLOCKS: usize = QK_K / QK;

/// How a [`Q4Matrix`] holds its blocks' scales and offsets.
#[derive(Clone)]
enum Scales {
    /// One `f32` scale `d` per block and an offset implied by it, `m = offset·d` (`Q4_0`:
    /// `offset = −8`, `Q5_0`: `−16`): a third less than a stored offset per block.
    Centered {
        /// `rows × blocks` scales.
        d: Vec<f32>,
        /// The offset in units of `d`, the same for every block.
        offset: f32,
    },
    /// One `f32` scale `d` and offset `m` per block, `v = d·q + m` (`Q4_1`, `Q5_1`, and parts
    /// of other kinds stacked with those).
    Block {
        /// `rows × blocks` scales.
        d: Vec<f32>,
        /// `rows × blocks` offsets.
        m: Vec<f32>,
    },
    /// k-quants: per super-block of [`SUB_BLOCKS`] blocks a scale `d` and a min `dmin`, per
    /// block 6-bit multipliers `sc` and `mn`: block scale `d·sc`, offset `−dmin·mn`.
    Super {
        /// `rows × blocks / 8` super-block scales.
        d: Vec<f32>,
        /// `rows × blocks / 8` super-block mins.
        dmin: Vec<f32>,
        /// `rows × blocks` scale multipliers (0..64).
        sc: Vec<u8>,
        /// `rows × blocks` min multipliers (0..64).
        mn: Vec<u8>,
    },
}

impl Scales {
    /// Whether scales of `other` can be appended to these as they are (`Centered` ones only
    /// with the same offset).
    fn same_kind(&self, other: &Scales) -> bool {
        match (self, other) {
            (Scales::Centered { offset: a, .. }, Scales::Centered { offset: b, .. }) => a == b,
            (Scales::Block { .. }, Scales::Block { .. })
            | (Scales::Super { .. }, Scales::Super { .. }) => true,
            _ => false,
        }
    }

    /// Empty scales of this kind, with room for `blocks` blocks.
    fn empty_like(&self, blocks: usize) -> Scales {
        match self {
            Scales::Centered { offset, .. } => Scales::Centered {
                d: Vec::with_capacity(blocks),
                offset: *offset,
            },
            Scales::Block { .. } => Scales::Block {
                d: Vec::with_capacity(blocks),
                m: Vec::with_capacity(blocks),
            },
            Scales::Super { .. } => Scales::Super {
                d: Vec::with_capacity(blocks / SUB_BLOCKS),
                dmin: Vec::with_capacity(blocks / SUB_BLOCKS),
                sc: Vec::with_capacity(blocks),
                mn: Vec::with_capacity(blocks),
            },
        }
    }
}

/// A `[rows, cols]` matrix of 4- or 5-bit blocks, row-major (`cols` a multiple of [`QK`]).
#[derive(Clone)]
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    blocks: usize,
    scales: Scales,
    /// `rows × blocks × 16` bytes: value `j` of a block in the low nibble of byte `j`, value
    /// `j + 16` in its high nibble (ggml's layout).
    nibbles: Vec<u8>,
    /// Empty for 4-bit values; else `rows × blocks × 4` bytes, a block's fifth bits as a
    /// little-endian `u32` whose bit `j` is value `j`'s 16.
    high: Vec<u8>,
}

impl std::fmt::Debug for Q4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Matrix[{}, {}]", self.rows, self.cols)
    }
}

/// One weight row of a [`Q4Matrix`], as the kernels read it.
#[derive(Clone, Copy)]
pub struct Q4Row<'a> {
    /// `blocks × 16` bytes.
    pub nibbles: &'a [u8],
    /// Empty (4-bit values) or `blocks × 4` bytes of fifth bits.
    pub high: &'a [u8],
    /// The blocks' scales and offsets.
    pub scales: RowScales<'a>,
}

/// One row's scales and offsets (see `Scales`).
#[derive(Clone, Copy)]
pub enum RowScales<'a> {
    /// Per block: scale `d[b]`, offset `offset·d[b]`.
    Centered {
        /// One scale per block.
        d: &'a [f32],
        /// The offset in units of the scale.
        offset: f32,
    },
    /// Per block: scale `d[b]`, offset `m[b]`.
    Block {
        /// One scale per block.
        d: &'a [f32],
        /// One offset per block.
        m: &'a [f32],
    },
    /// Per super-block `s` a scale `d[s]` and a min `dmin[s]`; block `b`'s scale is
    /// `d[b / 8]·sc[b]`, its offset `−dmin[b / 8]·mn[b]`.
    Super {
        /// One scale per super-block.
        d: &'a [f32],
        /// One min per super-block.
        dmin: &'a [f32],
        /// One scale multiplier per block.
        sc: &'a [u8],
        /// One min multiplier per block.
        mn: &'a [u8],
    },
}

impl RowScales<'_> {
    /// Blocks in the row.
    pub fn blocks(&self) -> usize {
        match self {
            RowScales::Centered { d, .. } | RowScales::Block { d, .. } => d.len(),
            RowScales::Super { sc, .. } => sc.len(),
        }
    }

    /// Whether the lengths fit a row of `blocks` blocks (the kernels read them unchecked).
    pub fn fit(&self, blocks: usize) -> bool {
        match self {
            RowScales::Centered { d, .. } => d.len() == blocks,
            RowScales::Block { d, m } => d.len() == blocks && m.len() == blocks,
            RowScales::Super { d, dmin, sc, mn } => {
                blocks.is_multiple_of(SUB_BLOCKS)
                    && d.len() * SUB_BLOCKS == blocks
                    && dmin.len() == d.len()
                    && sc.len() == blocks
                    && mn.len() == blocks
            }
        }
    }

    /// Block `b`'s scale and offset: `v = d·q + m`.
    pub fn of(&self, b: usize) -> (f32, f32) {
        match self {
            // The product the file's format defines (`Q4_0`: `−8·d`), exact in `f32`.
            RowScales::Centered { d, offset } => (d[b], offset * d[b]),
            RowScales::Block { d, m } => (d[b], m[b]),
            RowScales::Super { d, dmin, sc, mn } => {
                let s = b / SUB_BLOCKS;
                (d[s] * sc[b] as f32, -(dmin[s] * mn[b] as f32))
            }
        }
    }
}

/// Why GGUF bytes are not a 4-bit matrix this module reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Q4Error {
    /// Not `Q4_0`, `Q4_1`, `Q4_K`, `Q5_0`, `Q5_1` or `Q5_K`.
    #[error(
        "{0:?} is not a 4- or 5-bit block type kept as is (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K)"
    )]
    Type(GgmlType),
    /// The bytes do not hold `rows × cols` values of the type.
    #[error("{got} bytes for {rows} x {cols} values of {ty:?}")]
    Size {
        /// The type.
        ty: GgmlType,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes given.
        got: usize,
    },
}

impl Q4Matrix {
    /// Whether tensors of type `ty` can be kept as 4- or 5-bit blocks.
    pub fn keeps(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K) || Self::five_bit(ty)
    }

    /// Whether values of type `ty` have a fifth bit.
    fn five_bit(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K)
    }

    /// Copies a GGUF tensor of `rows × cols` values of type `ty` (one [`Q4Matrix::keeps`]),
    /// its row `r` taken from the file's row `source_row(r)` (llama's q/k un-permutation, or
    /// `r`).
    pub fn from_gguf(
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        source_row: impl Fn(usize) -> usize + Sync,
    ) -> Result<Self, Q4Error> {
        let (per_block, block_bytes) = match ty.block_layout() {
            Some(layout) if Self::keeps(ty) => layout,
            _ => return Err(Q4Error::Type(ty)),
        };
        let blocks = cols / QK;
        let row_bytes = cols / per_block * block_bytes;
        if !cols.is_multiple_of(per_block) || bytes.len() != rows * row_bytes {
            return Err(Q4Error::Size {
                ty,
                rows,
                cols,
                got: bytes.len(),
            });
        }
        // A row map that leaves the tensor is a caller's bug; checked once here so the copy
        // below cannot index out of range.
        if (0..rows).any(|r| source_row(r) >= rows) {
            return Err(Q4Error::Size {
                ty,
                rows,
                cols,
                got: bytes.len(),
            });
        }
        let five = Self::five_bit(ty);
        let k_quant = matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K);
        let mut nibbles = vec![0u8; rows * blocks * NIBBLE_BYTES];
        let mut high = vec![0u8; if five { rows * blocks * HIGH_BYTES } else { 0 }];
        let file_row = |r: usize| {
            let src = source_row(r);
            &bytes[src * row_bytes..(src + 1) * row_bytes]
        };
        // Each row's fifth bits, or an empty slice per row for 4-bit types.
        let high_rows: Vec<&mut [u8]> = if five && blocks > 0 {
            high.chunks_mut(blocks * HIGH_BYTES).collect()
        } else {
            (0..rows).map(|_| &mut [][..]).collect()
        };
        let scales = if blocks == 0 {
            Scales::Block {
                d: Vec::new(),
                m: Vec::new(),
            }
        } else if k_quant {
            let supers = blocks / SUB_BLOCKS;
            let (mut d, mut dmin) = (vec![0f32; rows * supers], vec![0f32; rows * supers]);
            let (mut sc, mut mn) = (vec![0u8; rows * blocks], vec![0u8; rows * blocks]);
            d.par_chunks_mut(supers)
                .zip(dmin.par_chunks_mut(supers))
                .zip(sc.par_chunks_mut(blocks).zip(mn.par_chunks_mut(blocks)))
                .zip(nibbles.par_chunks_mut(blocks * NIBBLE_BYTES))
                .zip(high_rows)
                .enumerate()
                .for_each(|(r, ((((d, dmin), (sc, mn)), nib), high))| {
                    let row = file_row(r);
                    for (k, blk) in row.chunks_exact(block_bytes).enumerate() {
                        let at = k * SUB_BLOCKS;
                        (d[k], dmin[k]) = (f16_at(blk, 0), f16_at(blk, 2));
                        for s in 0..SUB_BLOCKS {
                            (sc[at + s], mn[at + s]) = scale_min_k4(s, &blk[4..16]);
                        }
                        let nib = &mut nib[at * NIBBLE_BYTES..];
                        if five {
                            let high = &mut high[at * HIGH_BYTES..];
                            repack_k(&blk[48..], Some(&blk[16..48]), nib, high);
                        } else {
                            repack_k(&blk[16..], None, nib, &mut []);
                        }
                    }
                });
            Scales::Super { d, dmin, sc, mn }
        } else {
            // `Q4_0`/`Q5_0` offsets follow from their scales: none stored (`m` stays empty).
            let centered = match ty {
                GgmlType::Q4_0 => Some(-8.0),
                GgmlType::Q5_0 => Some(-16.0),
                _ => None,
            };
            let mut d = vec![0f32; rows * blocks];
            let mut m = vec![0f32; if centered.is_some() { 0 } else { rows * blocks }];
            let m_rows: Vec<&mut [f32]> = if centered.is_some() {
                (0..rows).map(|_| &mut [][..]).collect()
            } else {
                m.chunks_mut(blocks).collect()
            };
            d.par_chunks_mut(blocks)
                .zip(m_rows)
                .zip(nibbles.par_chunks_mut(blocks * NIBBLE_BYTES))
                .zip(high_rows)
                .enumerate()
                .for_each(|(r, (((d, m), nib), high))| {
                    copy_row(ty, file_row(r), block_bytes, d, m, nib, high);
                });
            match centered {
                Some(offset) => Scales::Centered { d, offset },
                None => Scales::Block { d, m },
            }
        };
        Ok(Q4Matrix {
            rows,
            cols,
            blocks,
            scales,
            nibbles,
            high,
        })
    }

    /// The same values with one scale and offset per block (what a part stacked with parts of
    /// other scale kinds becomes: exact, the products of `f16` and 6 bits, or of `f16` and a
    /// power of two, fit in `f32`).
    fn into_block_scales(self) -> Q4Matrix {
        if let Scales::Block { .. } = self.scales {
            return self;
        }
        let n = self.rows * self.blocks;
        let (mut d, mut m) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for r in 0..self.rows {
            let row = self.row(r).scales;
            for b in 0..self.blocks {
                let (db, mb) = row.of(b);
                d.push(db);
                m.push(mb);
            }
        }
        Q4Matrix {
            scales: Scales::Block { d, m },
            ..self
        }
    }

    /// The matrices one under the other (a fused projection): with the parts' scales when
    /// they are all of one kind (super-block, or centered with one offset), else per block.
    ///
    /// # Panics
    /// When the parts' column counts differ (a caller's bug: shapes are checked at load).
    pub fn stack(mut parts: Vec<Q4Matrix>) -> Q4Matrix {
        if parts.len() == 1 {
            return parts.remove(0);
        }
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(parts.iter().all(|p| p.cols == cols), "Q4Matrix::stack");
        let one_kind = parts.iter().all(|p| p.scales.same_kind(&parts[0].scales));
        if !one_kind {
            parts = parts.into_iter().map(Q4Matrix::into_block_scales).collect();
        }
        // A 4-bit part stacked with 5-bit ones gets fifth bits of zero: the same values.
        let five = parts.iter().any(|p| !p.high.is_empty());
        // Reserved whole: extended part by part, each Vec's capacity would grow to up to twice
        // what it holds (`backflow generate` on the 0.5B Qwen file peaked at 740-746 MB before,
        // 732 after).
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let all_blocks = rows * (cols / QK);
        let mut scales = match parts.first() {
            Some(p) => p.scales.empty_like(all_blocks),
            None => Scales::Block {
                d: Vec::new(),
                m: Vec::new(),
            },
        };
        let mut nibbles = Vec::with_capacity(all_blocks * NIBBLE_BYTES);
        let mut high = Vec::with_capacity(if five { all_blocks * HIGH_BYTES } else { 0 });
        for p in parts {
            match (&mut scales, &p.scales) {
                (Scales::Centered { d, .. }, Scales::Centered { d: pd, .. }) => {
                    d.extend_from_slice(pd);
                }
                (Scales::Block { d, m }, Scales::Block { d: pd, m: pm }) => {
                    d.extend_from_slice(pd);
                    m.extend_from_slice(pm);
                }
                (
                    Scales::Super { d, dmin, sc, mn },
                    Scales::Super {
                        d: pd,
                        dmin: pdmin,
                        sc: psc,
                        mn: pmn,
                    },
                ) => {
                    d.extend_from_slice(pd);
                    dmin.extend_from_slice(pdmin);
                    sc.extend_from_slice(psc);
                    mn.extend_from_slice(pmn);
                }
                _ => unreachable!("Q4Matrix::stack: the parts' scales were made one kind above"),
            }
            nibbles.extend_from_slice(&p.nibbles);
            if !p.high.is_empty() {
                high.extend_from_slice(&p.high);
            } else if five {
                high.resize(high.len() + p.rows * p.blocks * HIGH_BYTES, 0);
            }
        }
        Q4Matrix {
            rows,
            cols,
            blocks: cols / QK,
            scales,
            nibbles,
            high,
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
        let scales = match &self.scales {
            Scales::Centered { d, .. } => d.len() * 4,
            Scales::Block { d, m } => (d.len() + m.len()) * 4,
            Scales::Super { d, dmin, sc, mn } => (d.len() + dmin.len()) * 4 + sc.len() + mn.len(),
        };
        scales + self.nibbles.len() + self.high.len()
    }

    /// Whether the values have a fifth bit.
    pub fn is_five_bit(&self) -> bool {
        !self.high.is_empty()
    }

    /// Whether the scales are kept per super-block (a k-quant's), not per block.
    pub fn has_super_block_scales(&self) -> bool {
        matches!(self.scales, Scales::Super { .. })
    }

    /// Row `r` for the kernels.
    pub fn row(&self, r: usize) -> Q4Row<'_> {
        let b = self.blocks;
        let s = b / SUB_BLOCKS;
        Q4Row {
            nibbles: &self.nibbles[r * b * NIBBLE_BYTES..(r + 1) * b * NIBBLE_BYTES],
            high: self
                .high
                .get(r * b * HIGH_BYTES..(r + 1) * b * HIGH_BYTES)
                .unwrap_or(&[]),
            scales: match &self.scales {
                Scales::Centered { d, offset } => RowScales::Centered {
                    d: &d[r * b..(r + 1) * b],
                    offset: *offset,
                },
                Scales::Block { d, m } => RowScales::Block {
                    d: &d[r * b..(r + 1) * b],
                    m: &m[r * b..(r + 1) * b],
                },
                Scales::Super { d, dmin, sc, mn } => RowScales::Super {
                    d: &d[r * s..(r + 1) * s],
                    dmin: &dmin[r * s..(r + 1) * s],
                    sc: &sc[r * b..(r + 1) * b],
                    mn: &mn[r * b..(r + 1) * b],
                },
            },
        }
    }

    /// Row `r` as `f32` values (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let (d, m) = row.scales.of(b);
            for (o, &q) in o.iter_mut().zip(&row.block_values(b)) {
                *o = d * q as f32 + m;
            }
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

impl Q4Row<'_> {
    /// Block `b`'s 32 unsigned values (0..16, or 0..32 with fifth bits), in order: what the
    /// dequantization and the portable kernel read.
    pub fn block_values(&self, b: usize) -> [u8; QK] {
        let nib = &self.nibbles[b * NIBBLE_BYTES..(b + 1) * NIBBLE_BYTES];
        let fifth = (self.high.get(b * HIGH_BYTES..(b + 1) * HIGH_BYTES))
            .map_or(0, |h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
        let bit = |j: usize| (((fifth >> j) & 1) << 4) as u8;
        let mut q = [0u8; QK];
        for (j, &byte) in nib.iter().enumerate() {
            q[j] = (byte & 0x0F) | bit(j);
            q[j + NIBBLE_BYTES] = (byte >> 4) | bit(j + NIBBLE_BYTES);
        }
        q
    }
}

/// One file row of a `Q4_0`, `Q4_1`, `Q5_0` or `Q5_1` tensor into a row's scales `d`,
/// offsets `m`, nibbles and (5-bit types) fifth bits.
fn copy_row(
    ty: GgmlType,
    row: &[u8],
    block_bytes: usize,
    d: &mut [f32],
    m: &mut [f32],
    nib: &mut [u8],
    high: &mut [u8],
) {
    for (b, blk) in row.chunks_exact(block_bytes).enumerate() {
        // (scale, offset, fifth bits, nibbles) of each GGUF block layout.
        let (scale, offset, fifth, values) = match ty {
            GgmlType::Q4_0 => {
                let s = f16_at(blk, 0);
                (s, -8.0 * s, None, &blk[2..])
            }
            GgmlType::Q5_0 => {
                let s = f16_at(blk, 0);
                (s, -16.0 * s, Some(&blk[2..6]), &blk[6..])
            }
            GgmlType::Q5_1 => (f16_at(blk, 0), f16_at(blk, 2), Some(&blk[4..8]), &blk[8..]),
            _ => (f16_at(blk, 0), f16_at(blk, 2), None, &blk[4..]),
        };
        d[b] = scale;
        // Empty for `Q4_0`/`Q5_0`, whose offsets follow from their scales.
        if let Some(m) = m.get_mut(b) {
            *m = offset;
        }
        nib[b * NIBBLE_BYTES..(b + 1) * NIBBLE_BYTES].copy_from_slice(values);
        if let Some(fifth) = fifth {
            high[b * HIGH_BYTES..(b + 1) * HIGH_BYTES].copy_from_slice(fifth);
        }
    }
}

/// The values of one `Q4_K` super-block (`block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8
/// qs[128]; }`), or `Q5_K`'s (the same with `u8 qh[32]` before `qs`: bit `s` of `qh[l]` is
/// the fifth bit of value `l` of sub-block `s`), as eight sub-blocks: 8 × 16 bytes of nibbles
/// at the start of `nib` (value `j` of a sub-block in the low nibble of its byte `j`, value
/// `j + 16` in the high one) and, with `qh`, 8 × 4 bytes of fifth bits at the start of `high`.
fn repack_k(qs: &[u8], qh: Option<&[u8]>, nib: &mut [u8], high: &mut [u8]) {
    for s in 0..SUB_BLOCKS {
        // Sub-blocks 2g and 2g + 1 share 32 bytes: the low nibbles are 2g's values 0..32,
        // the high nibbles 2g + 1's.
        let q = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        let value = |l: usize| if s % 2 == 0 { q[l] & 0x0F } else { q[l] >> 4 };
        for (j, out) in nib[s * NIBBLE_BYTES..(s + 1) * NIBBLE_BYTES]
            .iter_mut()
            .enumerate()
        {
            *out = value(j) | (value(j + NIBBLE_BYTES) << 4);
        }
        if let Some(qh) = qh {
            let bits = (0..QK).fold(0u32, |acc, l| acc | ((((qh[l] >> s) & 1) as u32) << l));
            high[s * HIGH_BYTES..(s + 1) * HIGH_BYTES].copy_from_slice(&bits.to_le_bytes());
        }
    }
}

impl super::BlockWeights for Q4Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        Q4Matrix::dequantize_row(self, r, out);
    }

    const USES_SUMS: bool = true;

    /// A super-block's eight blocks share their activations' scale: the kernel sums them in
    /// integers, each times its 6-bit `sc`, and scales the sum once.
    fn activation_group(&self) -> usize {
        match self.scales {
            Scales::Super { .. } => SUB_BLOCKS,
            _ => 1,
        }
    }

    fn dots(&self, kernel: Kernel, j: usize, xs: &[super::ActRow<'_>], out: &mut [f32]) {
        kernels::dot_q4(kernel, self.row(j), xs, out);
    }

    fn dots_pair(
        &self,
        kernel: Kernel,
        j: usize,
        xs: &[super::ActRow<'_>],
        out: &mut [[f32; super::ROWS]; 2],
    ) {
        kernels::dot_q4_pair(kernel, [self.row(j), self.row(j + 1)], xs, out);
    }

    /// The unsigned values, each block's offset times the activations' block sums.
    fn panel_format(&self) -> super::PanelFormat {
        super::PanelFormat {
            step: QK,
            zero: 0,
            offsets: true,
        }
    }

    fn unpack_row(&self, r: usize, values: &mut [u8], scales: &mut [f32], offsets: &mut [f32]) {
        let row = self.row(r);
        kernels::unpack_q4(row, values);
        for (b, (d, m)) in scales.iter_mut().zip(offsets.iter_mut()).enumerate() {
            (*d, *m) = row.scales.of(b);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// GGUF bytes of random `Q4_0`, `Q4_1`, `Q5_0` or `Q5_1` blocks, and their values computed
    /// here from the format's definition (the independent reference): a 5-bit value's fifth
    /// bit `j` is bit `j` of the little-endian `u32` before the nibbles.
    pub(crate) fn random_blocks(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut bytes, mut values) = (Vec::new(), vec![0f32; rows * cols]);
        let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
        for blk in 0..rows * cols / QK {
            let d = half::f16::from_f32(rng.random_range(0.001f32..0.05));
            let m = half::f16::from_f32(rng.random_range(-0.4f32..0.0));
            bytes.extend(d.to_le_bytes());
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                bytes.extend(m.to_le_bytes());
            }
            let top = if five { 32 } else { 16 };
            let q: Vec<u8> = (0..QK).map(|_| rng.random_range(0..top)).collect();
            if five {
                let bits = (0..QK).fold(0u32, |acc, j| acc | (((q[j] >> 4) as u32) << j));
                bytes.extend(bits.to_le_bytes());
            }
            for j in 0..NIBBLE_BYTES {
                bytes.push((q[j] & 0x0F) | ((q[j + NIBBLE_BYTES] & 0x0F) << 4));
            }
            for (j, &q) in q.iter().enumerate() {
                values[blk * QK + j] = match ty {
                    GgmlType::Q4_0 => d.to_f32() * (q as f32 - 8.0),
                    GgmlType::Q5_0 => d.to_f32() * (q as f32 - 16.0),
                    _ => d.to_f32() * q as f32 + m.to_f32(),
                };
            }
        }
        (bytes, values)
    }

    #[test]
    fn blocks_are_kept_exactly() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let (bytes, values) = random_blocks(ty, 5, 64, 1);
            let q = Q4Matrix::from_gguf(ty, &bytes, 5, 64, |r| r).expect("q4");
            assert_eq!(q.dequantize(), values, "{ty:?}");
            // The GGUF reader's dequantization (checked against the `gguf` Python package)
            // agrees with the values made here.
            let reader = crate::model::gguf::dequantize(ty, &bytes, 5 * 64).expect("reader");
            assert_eq!(reader, values, "{ty:?}");
            let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
            assert_eq!(q.is_five_bit(), five);
            // Per block 16 bytes of nibbles, 4 of fifth bits, an f32 scale, an f32 offset
            // unless the format fixes it.
            let stored_offset = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
            let per_block = 16 + 4 * (five as usize) + 4 + 4 * (stored_offset as usize);
            assert_eq!(q.bytes(), 5 * 2 * per_block);
            // A row map: reversed rows.
            let rev = Q4Matrix::from_gguf(ty, &bytes, 5, 64, |r| 4 - r).expect("q4");
            let mut row = vec![0f32; 64];
            rev.dequantize_row(0, &mut row);
            assert_eq!(row, values[4 * 64..].to_vec());
        }
    }

    /// GGUF bytes of random `Q4_K` super-blocks (every byte random but the two `f16` scales),
    /// or `Q5_K` ones (32 random bytes of fifth bits more).
    pub(crate) fn random_k(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        let fifth = if ty == GgmlType::Q5_K { 32 } else { 0 };
        for _ in 0..rows * cols / QK_K {
            bytes.extend(half::f16::from_f32(rng.random_range(0.0005f32..0.004)).to_le_bytes());
            bytes.extend(half::f16::from_f32(rng.random_range(0.0f32..0.01)).to_le_bytes());
            bytes.extend((0..12 + fifth + QK_K / 2).map(|_| rng.random::<u8>()));
        }
        bytes
    }

    /// The repacked super-blocks hold the values the GGUF reader's `Q4_K`/`Q5_K`
    /// dequantization gives (that one is checked against the `gguf` Python package), bit for
    /// bit.
    #[test]
    fn k_super_blocks_repack_exactly() {
        let (rows, cols) = (3, 512);
        // Bytes per 32 values: 16 of nibbles, a byte each of `sc` and `mn`, an eighth of the
        // super-block's two `f32` (8 bytes), and 4 of fifth bits for `Q5_K`.
        for (ty, per_block) in [(GgmlType::Q4_K, 19), (GgmlType::Q5_K, 23)] {
            let bytes = random_k(ty, rows, cols, 5);
            let want = crate::model::gguf::dequantize(ty, &bytes, rows * cols).expect("k-quant");
            let q = Q4Matrix::from_gguf(ty, &bytes, rows, cols, |r| r).expect("q4");
            assert!(q.has_super_block_scales());
            assert_eq!(q.dequantize(), want, "{ty:?}");
            assert_eq!(q.bytes(), rows * cols / QK * per_block);
            let rev = Q4Matrix::from_gguf(ty, &bytes, rows, cols, |r| 2 - r).expect("q4");
            let mut row = vec![0f32; cols];
            rev.dequantize_row(0, &mut row);
            assert_eq!(row, want[2 * cols..].to_vec(), "{ty:?}");
            // A row that does not fill whole super-blocks is refused.
            let short = random_k(ty, 1, 256, 6);
            assert!(Q4Matrix::from_gguf(ty, &short, 2, 128, |r| r).is_err());
        }
    }

    /// A fused projection of 4- and 5-bit parts keeps every part's values.
    #[test]
    fn stacking_four_and_five_bit_parts_keeps_their_values() {
        let (b4, v4) = random_blocks(GgmlType::Q4_0, 2, 64, 7);
        let (b5, v5) = random_blocks(GgmlType::Q5_0, 3, 64, 8);
        let q4 = Q4Matrix::from_gguf(GgmlType::Q4_0, &b4, 2, 64, |r| r).expect("q4");
        let q5 = Q4Matrix::from_gguf(GgmlType::Q5_0, &b5, 3, 64, |r| r).expect("q5");
        let both = Q4Matrix::stack(vec![q4.clone(), q5.clone(), q4]);
        assert!(both.is_five_bit());
        assert_eq!(both.rows(), 7);
        assert_eq!(both.dequantize(), [&v4[..], &v5[..], &v4[..]].concat());
        // Parts of one centered type stay centered (no offsets stored: 24 bytes a 5-bit
        // block), with their values.
        let five = Q4Matrix::stack(vec![q5.clone(), q5]);
        assert_eq!(five.bytes(), 6 * 2 * (16 + 4 + 4));
        assert_eq!(five.dequantize(), [&v5[..], &v5[..]].concat());
        // Mixed offsets (−8 and −16) cannot share one: offsets stored per block.
        assert_eq!(both.bytes(), 7 * 2 * (16 + 4 + 4 + 4));
    }

    /// k-quant parts stacked together keep their super-block scales; stacked with another
    /// block type they get per-block ones; the values are every part's either way, and the
    /// product of each stack is its dequantized product (every kernel).
    #[test]
    fn stacking_k_quant_parts_keeps_their_values() {
        let k4 = random_k(GgmlType::Q4_K, 2, 256, 9);
        let k5 = random_k(GgmlType::Q5_K, 3, 256, 10);
        let (b0, v0) = random_blocks(GgmlType::Q5_0, 1, 256, 11);
        let v4 = crate::model::gguf::dequantize(GgmlType::Q4_K, &k4, 2 * 256).expect("k4");
        let v5 = crate::model::gguf::dequantize(GgmlType::Q5_K, &k5, 3 * 256).expect("k5");
        let q4 = Q4Matrix::from_gguf(GgmlType::Q4_K, &k4, 2, 256, |r| r).expect("q4");
        let q5 = Q4Matrix::from_gguf(GgmlType::Q5_K, &k5, 3, 256, |r| r).expect("q5");
        let q0 = Q4Matrix::from_gguf(GgmlType::Q5_0, &b0, 1, 256, |r| r).expect("q0");
        let factored = Q4Matrix::stack(vec![q4.clone(), q5.clone()]);
        assert!(factored.has_super_block_scales() && factored.is_five_bit());
        assert_eq!(factored.dequantize(), [&v4[..], &v5[..]].concat());
        let mixed = Q4Matrix::stack(vec![q4, q0, q5]);
        assert!(!mixed.has_super_block_scales());
        assert_eq!(mixed.dequantize(), [&v4[..], &v0[..], &v5[..]].concat());
        for (q, values) in [
            (&factored, [&v4[..], &v5[..]].concat()),
            (&mixed, [&v4[..], &v0[..], &v5[..]].concat()),
        ] {
            super::super::assert_every_kernel_matches(q, &values, 3, "stacked");
        }
    }

    /// Kept factored, a k-quant multiplies out to the same per-block scales (what this module
    /// kept before); the factored form takes activations with one scale per super-block
    /// (`Q8_K`-style) and the per-block form one per block, and each product is the f64
    /// product of its own activations with the file's values, on every kernel.
    #[test]
    fn super_block_scales_multiply_out_to_block_scales() {
        use super::super::BlockWeights;
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
            let bytes = random_k(ty, 7, 512, 12);
            let values = crate::model::gguf::dequantize(ty, &bytes, 7 * 512).expect("values");
            let factored = Q4Matrix::from_gguf(ty, &bytes, 7, 512, |r| r).expect("k");
            let unfolded = factored.clone().into_block_scales();
            assert!(!unfolded.has_super_block_scales());
            assert_eq!(unfolded.dequantize(), factored.dequantize());
            assert_eq!(
                (factored.activation_group(), unfolded.activation_group()),
                (8, 1)
            );
            for m in [1, 3, 4, 9] {
                super::super::assert_every_kernel_matches(&factored, &values, m, "factored");
                super::super::assert_every_kernel_matches(&unfolded, &values, m, "unfolded");
            }
        }
    }

    #[test]
    fn wrong_types_sizes_and_row_maps_are_errors() {
        let (bytes, _) = random_blocks(GgmlType::Q4_1, 2, 32, 2);
        let err = Q4Matrix::from_gguf(GgmlType::Q8_0, &bytes, 2, 32, |r| r);
        assert_eq!(err.err(), Some(Q4Error::Type(GgmlType::Q8_0)));
        assert!(Q4Matrix::from_gguf(GgmlType::Q4_1, &bytes[1..], 2, 32, |r| r).is_err());
        assert!(Q4Matrix::from_gguf(GgmlType::Q4_1, &bytes, 2, 32, |r| r + 1).is_err());
    }

    #[test]
    fn every_kernel_matches_the_f32_product() {
        let shapes = |ty| match ty {
            GgmlType::Q4_K | GgmlType::Q5_K => vec![(1, 7, 256), (5, 9, 512), (50, 6, 256)],
            _ => vec![
                (1, 7, 32),
                (3, 33, 64),
                (6, 17, 160),
                (21, 9, 96),
                (50, 20, 96),
            ],
        };
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4_K,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q5_K,
        ];
        for ty in types {
            for (m, n, k) in shapes(ty) {
                let (bytes, w) = match ty {
                    GgmlType::Q4_K | GgmlType::Q5_K => {
                        let bytes = random_k(ty, n, k, 3 + m as u64);
                        let w = crate::model::gguf::dequantize(ty, &bytes, n * k).expect("k");
                        (bytes, w)
                    }
                    _ => random_blocks(ty, n, k, 3 + m as u64),
                };
                let q = Q4Matrix::from_gguf(ty, &bytes, n, k, |r| r).expect("q4");
                super::super::assert_every_kernel_matches(&q, &w, m, &format!("{ty:?}"));
            }
        }
    }
}
