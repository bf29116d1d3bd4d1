//! The nibble kernels' inner loop on AVX2 (machines without AVX-512 VNNI): the same panels,
//! multiplied a quarter of a panel (8 columns, one 32-byte register of 8 columns × 4 values)
//! at a time.
//!
//! AVX2 has no `vpdpbusd`. Its `vpmaddubsw` multiplies unsigned weight bytes by signed
//! activation bytes and adds neighbouring pairs into 16-bit lanes, with saturation; llama.cpp's
//! AVX2 dot kernels follow each one by a `vpmaddwd` by ones (to 32 bits). Here the weights are
//! at most 31 (4- and 5-bit values) and the activations within ±128, so a 16-bit lane holds
//! the sum of 16 products of 4-bit values, or 8 of 5-bit values, exactly: a block's products
//! are summed in 16 bits and widened once per block (4-bit) or twice (5-bit), half the
//! instructions of widening every product.
//!
//! A quarter at a time: the 16 registers of AVX2 hold a tile's four rows' accumulators (16-bit
//! and `f32`) with the unpacked weights beside them; a whole panel's would not fit.

use super::{GROUP_BYTES, MASKS};
use std::arch::x86_64::*;

/// Columns in a quarter of a panel: one register of 8 columns × 4 values.
pub(super) const QUARTER: usize = 8;

/// Per activation row `i`, the integer products of block `b`'s 32 values with the row's, for
/// the panel's columns `8·quarter..8·quarter + 8` (as eight `i32`), each column's times its
/// multiplier in `times` (both 16-bit halves of its lane: [`ones`], or a k-quant block's
/// `sc`, [`sixteen_bit_pairs`]), applied by the `vpmaddwd` that widens the 16-bit sums anyway.
/// `FIVE`: 16 added where a fifth bit is set.
///
/// # Safety
/// The CPU has AVX2 (the caller's `target_feature`); `values` holds the panel's groups of
/// block `b`, `fifth` (with `FIVE`) their masks, and each `x[i]` the row's 32 values of the
/// block at `32·b`, all within ±128; `times` at most 63.
#[inline(always)]
pub(super) unsafe fn block_products<const R: usize, const FIVE: bool>(
    values: *const u8,
    fifth: *const u64,
    b: usize,
    quarter: usize,
    x: &[*const i8; R],
    times: __m256i,
) -> [__m256i; R] {
    let nibble = _mm256_set1_epi8(0x0F);
    // A group's bytes: 64 for columns 0..16, then 64 for 16..32; a quarter is 32 of them.
    let (half, within) = (quarter / 2, quarter % 2);
    let offset = half * 64 + within * 32;
    let mut sums = [_mm256_setzero_si256(); R];
    let mut sums16 = [_mm256_setzero_si256(); R];
    for (j, g) in (b * 4..b * 4 + 4).enumerate() {
        let v = _mm256_loadu_si256(values.add(g * GROUP_BYTES + offset) as *const __m256i);
        let mut low = _mm256_and_si256(v, nibble);
        let mut high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        if FIVE {
            // This quarter's bits of the half's masks: bit `j` is the register's byte `j`.
            let masks = fifth.add(g * MASKS + 2 * half);
            let shift = 32 * within;
            low = _mm256_or_si256(low, sixteens((*masks >> shift) as u32));
            high = _mm256_or_si256(high, sixteens((*masks.add(1) >> shift) as u32));
        }
        for i in 0..R {
            let four =
                |at: usize| _mm256_set1_epi32(std::ptr::read_unaligned(x[i].add(at) as *const i32));
            let products = _mm256_add_epi16(
                _mm256_maddubs_epi16(low, four(8 * g)),
                _mm256_maddubs_epi16(high, four(8 * g + 4)),
            );
            sums16[i] = _mm256_add_epi16(sums16[i], products);
        }
        // 5-bit values: widen after two groups (8 products of at most 31·128 a lane).
        if FIVE && j == 1 {
            for i in 0..R {
                sums[i] = _mm256_madd_epi16(sums16[i], times);
                sums16[i] = _mm256_setzero_si256();
            }
        }
    }
    for i in 0..R {
        sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(sums16[i], times));
    }
    sums
}

/// Every 16-bit lane 1: [`block_products`] without a multiplier.
///
/// # Safety
/// The CPU has AVX2 (the caller's `target_feature`).
#[inline(always)]
pub(super) unsafe fn ones() -> __m256i {
    _mm256_set1_epi16(1)
}

/// Eight bytes from `v` (one per column of a quarter panel) each in both 16-bit halves of its
/// column's 32-bit lane, zero-extended: [`block_products`]'s `times`.
///
/// # Safety
/// The CPU has AVX2 (the caller's `target_feature`); `v` points to 8 readable bytes.
#[inline(always)]
pub(super) unsafe fn sixteen_bit_pairs(v: *const u8) -> __m256i {
    // SAFETY: the caller's.
    let lanes = unsafe { load_u8x8(v) };
    _mm256_or_si256(lanes, _mm256_slli_epi32(lanes, 16))
}

/// Two blocks' eight bytes from `a` and `b` (one per column each) as 16-bit pairs `(a[c],
/// b[c])` in column `c`'s 32-bit lane, zero-extended: multiplied by `vpmaddwd` with a pair of
/// the blocks' activation sums, one instruction gives `a·Σ_a + b·Σ_b` per column.
///
/// # Safety
/// The CPU has AVX2 (the caller's `target_feature`); `a` and `b` point to 8 readable bytes.
#[inline(always)]
pub(super) unsafe fn interleaved_pairs(a: *const u8, b: *const u8) -> __m256i {
    // SAFETY: the caller's.
    unsafe {
        let (a, b) = (
            _mm_loadl_epi64(a as *const __m128i),
            _mm_loadl_epi64(b as *const __m128i),
        );
        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b))
    }
}

/// A register whose byte `j` is 16 where `mask`'s bit `j` is set, else 0.
///
/// # Safety
/// The CPU has AVX2 (the caller's `target_feature`).
#[inline(always)]
unsafe fn sixteens(mask: u32) -> __m256i {
    // Byte j takes the mask's byte j / 8 (`vpshufb` indexes within each 128-bit lane, and
    // every lane holds the whole mask), then keeps its bit j % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(mask as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// Eight `f16` from `v` as `f32` (one scale per column of a quarter panel).
///
/// # Safety
/// The CPU has F16C (the caller's `target_feature`); `v` points to 8 readable `f16`.
#[inline(always)]
pub(super) unsafe fn load_f16x8(v: *const half::f16) -> __m256 {
    // SAFETY: the caller's.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(v as *const __m128i)) }
}

/// Eight bytes from `v` as eight `i32`, zero-extended (a quarter panel's unsigned multipliers:
/// `Q4_K`'s `sc` and `mn`).
///
/// # Safety
/// The CPU has AVX2 (the caller's `target_feature`); `v` points to 8 readable bytes.
#[inline(always)]
unsafe fn load_u8x8(v: *const u8) -> __m256i {
    // SAFETY: the caller's.
    unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(v as *const __m128i)) }
}

/// Eight bytes from `v` as eight `i32`, sign-extended (`Q6_K`'s signed `sc`).
///
/// # Safety
/// The CPU has AVX2 (the caller's `target_feature`); `v` points to 8 readable bytes.
#[inline(always)]
pub(super) unsafe fn load_i8x8(v: *const i8) -> __m256i {
    // SAFETY: the caller's.
    unsafe { _mm256_cvtepi8_epi32(_mm_loadl_epi64(v as *const __m128i)) }
}

/// Writes `R` rows of one quarter's accumulators into `out`'s columns `8·quarter..`.
///
/// # Safety
/// The CPU has AVX (the caller's `target_feature`); `quarter < 4`.
#[inline(always)]
pub(super) unsafe fn store_quarter<const R: usize>(
    acc: &[__m256; R],
    quarter: usize,
    out: &mut super::Tile,
) {
    for (row, acc) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(row.as_mut_ptr().add(QUARTER * quarter), *acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteens_sets_the_bytes_of_the_masks_bits() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        for mask in [0u32, 1, 0x8000_0001, 0xDEAD_BEEF, u32::MAX, 0x0102_0408] {
            let mut got = [0u8; 32];
            // SAFETY: the CPU has AVX2 (checked above); `got` holds 32 bytes.
            unsafe {
                #[target_feature(enable = "avx2")]
                unsafe fn run(mask: u32, out: &mut [u8; 32]) {
                    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, sixteens(mask));
                }
                run(mask, &mut got);
            }
            for (j, &b) in got.iter().enumerate() {
                let want = if (mask >> j) & 1 == 1 { 16 } else { 0 };
                assert_eq!(b, want, "mask {mask:#x} byte {j}");
            }
        }
    }
}
