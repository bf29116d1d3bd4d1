//! Dot products of Q8 rows: `Σ_blocks d_w·d_x·Σ_i w_i·x_i` over rows of [`super::QK`]-value
//! blocks, one weight row against up to [`ROWS`] activation rows at a time (the weight block is
//! loaded, and its absolute value taken, once for all of them).
//!
//! Four implementations, chosen once at run time by [`Kernel::detect`]:
//! - `Avx512Vnni`: two blocks per 512-bit register (`vpdpbusd` on 64 bytes, the two blocks'
//!   scales side by side in one float multiply-add), and two weight rows per call where the
//!   caller has them (`dot_pair`, `dot_q4_pair`), so an activation block is loaded once for
//!   both; for the per-block formats (`Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`). The k-quants
//!   run the AVX2 kernels under it. From [`super::PANEL_MIN_ROWS`] activation rows on, this
//!   machine multiplies through packed panels instead ([`super::panels`]);
//! - `AvxVnni`: `vpdpbusd` multiplies 32 unsigned by 32 signed bytes and adds the four products
//!   of each lane into an `i32` in one instruction;
//! - `Avx2`: the same product as `vpmaddubsw` (pairs into saturating `i16`, safe here: both
//!   operands are at most 127 in magnitude, so a pair is at most 32 258) then `vpmaddwd`;
//! - `Portable`: plain integer loops, for every other machine and as the tests' reference.
//!
//! Both vector paths use llama.cpp's sign trick (`ggml_vec_dot_q8_0_q8_0`): the unsigned operand
//! is `|w|` and the signed one `x·sign(w)`, so `|w|·x·sign(w) = w·x`. The `i32` block sums go to
//! `f32` and are scaled by the two block scales into eight `f32` lanes, summed at the end.
//!
//! The k-quant kernels (`Q4_K`, `Q5_K`, `Q6_K`) take activations with one scale per 256-value
//! super-block, as llama.cpp's `Q8_K` (the product quantizes them so: `BlockWeights::
//! activation_group`): the weights' small integer sub-block scales then multiply the `i16`
//! pair sums in `vpmaddwd`, a super-block's sums add up in `i32`, and only one conversion and
//! float multiply-add per super-block remain (both vector kernels use `vpmaddubsw` there:
//! `vpdpbusd` would need a separate multiply by the scale).

use super::QK;

/// Activation rows one call of a kernel multiplies against a weight row.
pub const ROWS: usize = 4;

/// One row of Q8 blocks: `quants.len() == scales.len() * QK`.
#[derive(Clone, Copy)]
pub struct RowRef<'a> {
    /// The signed 8-bit values, block after block.
    pub quants: &'a [i8],
    /// One scale per block.
    pub scales: &'a [f32],
}

/// One activation row for the 4-bit kernels: its 8-bit blocks and each block's `d·Σq`.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    /// The 8-bit blocks.
    pub row: RowRef<'a>,
    /// Per block, the scale times the sum of the values.
    pub sums: &'a [f32],
    /// Whether each super-block's eight blocks (256 values) share one scale, as the k-quant
    /// kernels need ([`super::Q8Matrix::quantize_grouped`]).
    pub super_scaled: bool,
}

/// The dot-product implementation this machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F, BW, VL and VNNI (with AVX2 and FMA).
    Avx512Vnni,
    /// AVX2 with AVX-VNNI's `vpdpbusd`.
    AvxVnni,
    /// AVX2 and FMA.
    Avx2,
    /// No vector instructions assumed.
    Portable,
}

impl Kernel {
    /// The fastest kernel the CPU supports (the last of [`Kernel::available`]).
    pub fn detect() -> Kernel {
        Kernel::available().pop().unwrap_or(Kernel::Portable)
    }

    /// [`Kernel::detect`], once per process; or the kernel `BACKFLOW_KERNEL` names
    /// (`portable`, `avx2`, `avx-vnni`, `avx512-vnni`) where this CPU runs it: an AVX-512
    /// machine measuring what an AVX2-only one would run (every choice downstream, resident
    /// panels and the prefill path, follows this one).
    pub fn machine() -> Kernel {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let Ok(name) = std::env::var("BACKFLOW_KERNEL") else {
                return Kernel::detect();
            };
            match Kernel::named(&name) {
                Some(k) if Kernel::available().contains(&k) => k,
                _ => {
                    log::warn!(
                        "BACKFLOW_KERNEL={name:?} is not a kernel this CPU runs (it runs {:?}); \
                         using {:?}",
                        Kernel::available(),
                        Kernel::detect()
                    );
                    Kernel::detect()
                }
            }
        })
    }

    /// The kernel of a `BACKFLOW_KERNEL` value.
    pub fn named(name: &str) -> Option<Kernel> {
        match name.to_ascii_lowercase().as_str() {
            "portable" => Some(Kernel::Portable),
            "avx2" => Some(Kernel::Avx2),
            "avx-vnni" | "avxvnni" => Some(Kernel::AvxVnni),
            "avx512-vnni" | "avx512vnni" => Some(Kernel::Avx512Vnni),
            _ => None,
        }
    }

    /// Every kernel this CPU can run, slowest first (the tests check each against the portable
    /// one).
    pub fn available() -> Vec<Kernel> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 {
                all.push(Kernel::Avx2);
            }
            if avx2 && is_x86_feature_detected!("avxvnni") {
                all.push(Kernel::AvxVnni);
            }
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                all.push(Kernel::Avx512Vnni);
            }
        }
        all
    }

    /// `out[r] = w · xs[r]` for every given activation row (at most [`ROWS`]; all rows the
    /// same number of blocks as `w`).
    pub fn dot(self, w: RowRef<'_>, xs: &[RowRef<'_>], out: &mut [f32]) {
        check_rows(&[w], xs, out.len());
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx512Vnni`, `Kernel::AvxVnni` and `Kernel::Avx2` are only
            // constructed by `detect` and `available` after checking the CPU has the features
            // these functions enable.
            Kernel::Avx512Vnni => unsafe {
                let mut o = [[0f32; ROWS]; 1];
                x86::dot_q8_512::<1>(&[w], xs, &mut o);
                out[..xs.len()].copy_from_slice(&o[0][..xs.len()]);
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::AvxVnni => unsafe { x86::dot_vnni(w, xs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx2 => unsafe { x86::dot_avx2(w, xs, out) },
            _ => dot_portable(w, xs, out),
        }
    }

    /// `out[i][r] = w[i] · xs[r]`: [`Kernel::dot`] for two weight rows, in one pass over the
    /// activation blocks where the kernel has one (each pair's value is the same as
    /// [`Kernel::dot`]'s).
    pub fn dot_pair(self, w: [RowRef<'_>; 2], xs: &[RowRef<'_>], out: &mut [[f32; ROWS]; 2]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `Kernel::dot`; the rows are checked as there.
            Kernel::Avx512Vnni => unsafe {
                check_rows(&w, xs, ROWS);
                x86::dot_q8_512::<2>(&w, xs, out)
            },
            _ => {
                let [a, b] = out;
                self.dot(w[0], xs, a);
                self.dot(w[1], xs, b);
            }
        }
    }
}

/// The vector kernels read blocks by raw pointer: every row must hold as many blocks as the
/// weight rows (checked once per call, not per block).
fn check_rows(ws: &[RowRef<'_>], xs: &[RowRef<'_>], out_len: usize) {
    let blocks = ws.first().map_or(0, |w| w.scales.len());
    assert!(
        xs.len() <= ROWS
            && out_len >= xs.len()
            && ws
                .iter()
                .all(|w| w.scales.len() == blocks && w.quants.len() == blocks * QK)
            && xs
                .iter()
                .all(|x| x.scales.len() == blocks && x.quants.len() == blocks * QK),
        "Kernel::dot: rows of different block counts"
    );
}

/// `out = d·q` block by block (`out.len() == scales.len() * QK`), vectorized where the CPU
/// allows: a weight tile is dequantized for every GEMM of a prefill.
pub fn dequantize(quants: &[i8], scales: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { x86::dequantize_avx2(quants, scales, out) };
        return;
    }
    dequantize_portable(quants, scales, out);
}

fn dequantize_portable(quants: &[i8], scales: &[f32], out: &mut [f32]) {
    for ((o, q), &d) in out
        .chunks_exact_mut(QK)
        .zip(quants.chunks_exact(QK))
        .zip(scales)
    {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = d * q as f32;
        }
    }
}

/// `out[r] = w · xs[r]` for a 4- or 5-bit weight row: per block
/// `d_w·d_x·Σ q_w·q_x + m_w·(d_x·Σq_x)`.
pub fn dot_q4(kernel: Kernel, w: super::q4::Q4Row<'_>, xs: &[ActRow<'_>], out: &mut [f32]) {
    check_q4_rows(&[w], xs, out.len());
    use super::q4::RowScales;
    match w.scales {
        // k-quant super-blocks: the integer kernel needs one activation scale per
        // super-block; over per-block scales (never from `product`) the portable loop.
        #[cfg(target_arch = "x86_64")]
        RowScales::Super { d, dmin, sc, mn }
            if matches!(kernel, Kernel::Avx512Vnni | Kernel::AvxVnni | Kernel::Avx2)
                && xs.iter().all(|x| x.super_scaled) =>
        {
            let scales = x86::SuperScales { d, dmin, sc, mn };
            // SAFETY: as in `Kernel::dot`; `fit` checked the scales' lengths.
            unsafe {
                if w.high.is_empty() {
                    x86::dot_q4_super::<false>(w, scales, xs, out)
                } else {
                    x86::dot_q4_super::<true>(w, scales, xs, out)
                }
            }
        }
        RowScales::Super { .. } => dot_q4_portable(w, xs, out),
        _ => match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `Kernel::dot`; the scales are per block (this arm).
            Kernel::Avx512Vnni => unsafe {
                let mut o = [[0f32; ROWS]; 1];
                x86::dot_q4_512::<1>(&[w], xs, &mut o);
                out[..xs.len()].copy_from_slice(&o[0][..xs.len()]);
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `Kernel::dot`.
            Kernel::AvxVnni if w.high.is_empty() => unsafe {
                x86::dot_q4_vnni::<false>(w, xs, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `Kernel::dot`.
            Kernel::AvxVnni => unsafe { x86::dot_q4_vnni::<true>(w, xs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `Kernel::dot`.
            Kernel::Avx2 if w.high.is_empty() => unsafe { x86::dot_q4_avx2::<false>(w, xs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `Kernel::dot`.
            Kernel::Avx2 => unsafe { x86::dot_q4_avx2::<true>(w, xs, out) },
            _ => dot_q4_portable(w, xs, out),
        },
    }
}

/// `out[i][r] = w[i] · xs[r]`: [`dot_q4`] for two rows of one matrix, in one pass over the
/// activation blocks where the kernel has one (each pair's value is the same as
/// [`dot_q4`]'s).
pub fn dot_q4_pair(
    kernel: Kernel,
    w: [super::q4::Q4Row<'_>; 2],
    xs: &[ActRow<'_>],
    out: &mut [[f32; ROWS]; 2],
) {
    use super::q4::RowScales;
    let per_block = |r: &super::q4::Q4Row<'_>| !matches!(r.scales, RowScales::Super { .. });
    let same_bits = w[0].high.is_empty() == w[1].high.is_empty();
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `Kernel::dot`; both rows' scales are per block (the guard).
        Kernel::Avx512Vnni if per_block(&w[0]) && per_block(&w[1]) && same_bits => unsafe {
            check_q4_rows(&w, xs, ROWS);
            x86::dot_q4_512::<2>(&w, xs, out)
        },
        _ => {
            let [a, b] = out;
            dot_q4(kernel, w[0], xs, a);
            dot_q4(kernel, w[1], xs, b);
        }
    }
}

/// As [`check_rows`], for 4- and 5-bit weight rows and their activations.
fn check_q4_rows(ws: &[super::q4::Q4Row<'_>], xs: &[ActRow<'_>], out_len: usize) {
    let blocks = ws.first().map_or(0, |w| w.scales.blocks());
    assert!(
        xs.len() <= ROWS
            && out_len >= xs.len()
            && ws.iter().all(|w| w.scales.blocks() == blocks
                && w.scales.fit(blocks)
                && w.nibbles.len() == blocks * QK / 2
                && (w.high.is_empty() || w.high.len() == blocks * super::q4::HIGH_BYTES))
            && xs.iter().all(|x| x.row.scales.len() == blocks
                && x.row.quants.len() == blocks * QK
                && x.sums.len() == blocks),
        "dot_q4: rows of different block counts"
    );
}

/// `out[r] = w · xs[r]` for a row of `Q6_K` super-blocks (`w.len()` a multiple of
/// [`super::q6::BLOCK_BYTES`], every activation row holding its 8 blocks per super-block): per
/// block `d_x·(s_0·Σ_{i<16} w_i·x_i + s_1·Σ_{i≥16} w_i·x_i)` with `s = d·sc` of each half.
pub fn dot_q6(kernel: Kernel, w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
    use super::q6::BLOCK_BYTES;
    let supers = w.len() / BLOCK_BYTES;
    let blocks = supers * (crate::model::gguf::QK_K / QK);
    // The vector kernels read blocks by raw pointer (see `Kernel::dot`).
    assert!(
        xs.len() <= ROWS
            && out.len() >= xs.len()
            && w.len() == supers * BLOCK_BYTES
            && xs
                .iter()
                .all(|x| x.row.scales.len() == blocks && x.row.quants.len() == blocks * QK),
        "dot_q6: rows of different block counts"
    );
    match kernel {
        // The integer kernel needs one activation scale per super-block; over per-block
        // scales (never from `product`) the portable loop.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `Kernel::dot`.
        Kernel::Avx512Vnni | Kernel::AvxVnni | Kernel::Avx2
            if xs.iter().all(|x| x.super_scaled) =>
        unsafe { x86::dot_q6_super(w, xs, out) },
        _ => dot_q6_portable(w, xs, out),
    }
}

/// A 4- or 5-bit row's unsigned values in order (`out.len()` = the row's blocks × [`QK`]), as
/// [`super::q4::Q4Row::block_values`] gives them block by block: what the panels pack.
///
/// # Panics
/// When the lengths do not fit (a caller's bug).
pub fn unpack_q4(w: super::q4::Q4Row<'_>, out: &mut [u8]) {
    let blocks = w.scales.blocks();
    assert!(
        out.len() == blocks * QK
            && w.nibbles.len() == blocks * QK / 2
            && (w.high.is_empty() || w.high.len() == blocks * super::q4::HIGH_BYTES),
        "unpack_q4: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above), the lengths just above.
        unsafe {
            if w.high.is_empty() {
                x86::unpack_q4::<false>(w, out)
            } else {
                x86::unpack_q4::<true>(w, out)
            }
        };
        return;
    }
    for (b, o) in out.chunks_exact_mut(QK).enumerate() {
        o.copy_from_slice(&w.block_values(b));
    }
}

/// A `Q6_K` row's raw 6-bit values in order (0..64, `v = d·sc·(q − 32)`; `out.len()` = the
/// row's super-blocks × 256).
///
/// # Panics
/// When the lengths do not fit (a caller's bug).
pub fn unpack_q6(w: &[u8], out: &mut [u8]) {
    use super::q6::BLOCK_BYTES;
    let supers = w.len() / BLOCK_BYTES;
    assert!(
        w.len() == supers * BLOCK_BYTES && out.len() == supers * crate::model::gguf::QK_K,
        "unpack_q6: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above), the lengths just above.
        unsafe { x86::unpack_q6(w, out) };
        return;
    }
    for (s, sb) in w.chunks_exact(BLOCK_BYTES).enumerate() {
        for b in 0..8 {
            let (q, _) = super::q6::block_values(sb, b);
            for (o, &v) in out[(s * 8 + b) * QK..][..QK].iter_mut().zip(&q) {
                *o = (v + 32) as u8;
            }
        }
    }
}

fn dot_q6_portable(w: &[u8], xs: &[ActRow<'_>], out: &mut [f32]) {
    use super::q6::{block_values, BLOCK_BYTES};
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        let mut acc = 0f32;
        for (s, sb) in w.chunks_exact(BLOCK_BYTES).enumerate() {
            for k in 0..8 {
                let b = s * 8 + k;
                let (q, sc) = block_values(sb, k);
                let xq = &x.row.quants[b * QK..(b + 1) * QK];
                let half = |h: usize| -> i32 {
                    (q[16 * h..16 * h + 16].iter().zip(&xq[16 * h..16 * h + 16]))
                        .map(|(&w, &x)| w as i32 * x as i32)
                        .sum()
                };
                acc += x.row.scales[b] * (sc[0] * half(0) as f32 + sc[1] * half(1) as f32);
            }
        }
        *o = acc;
    }
}

fn dot_q4_portable(w: super::q4::Q4Row<'_>, xs: &[ActRow<'_>], out: &mut [f32]) {
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        let mut acc = 0f32;
        for b in 0..w.scales.blocks() {
            let xq = &x.row.quants[b * QK..(b + 1) * QK];
            let s: i32 = (w.block_values(b).iter().zip(xq))
                .map(|(&q, &x)| q as i32 * x as i32)
                .sum();
            let (d, m) = w.scales.of(b);
            acc += d * x.row.scales[b] * s as f32 + m * x.sums[b];
        }
        *o = acc;
    }
}

/// The reference: integer sums per block, scaled in `f32`.
fn dot_portable(w: RowRef<'_>, xs: &[RowRef<'_>], out: &mut [f32]) {
    for (x, o) in xs.iter().zip(out.iter_mut()) {
        let mut acc = 0f32;
        for (b, (wq, xq)) in w
            .quants
            .chunks_exact(QK)
            .zip(x.quants.chunks_exact(QK))
            .enumerate()
        {
            let s: i32 = wq.iter().zip(xq).map(|(&a, &c)| a as i32 * c as i32).sum();
            acc += w.scales[b] * x.scales[b] * s as f32;
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{RowRef, QK, ROWS};
    use std::arch::x86_64::*;

    /// Horizontal sum of eight `f32` lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The shared loop: `block_dot(|w|, x·sign(w))` gives eight `i32` partial sums of a block.
    #[inline(always)]
    unsafe fn dot_with(
        w: RowRef<'_>,
        xs: &[RowRef<'_>],
        out: &mut [f32],
        block_dot: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        let n = xs.len().min(ROWS);
        // One accumulator per activation row (two sets over the two halves of the blocks, to
        // hide the `vfmadd` latency when there is one row, measured no better on this VM).
        let mut acc = [_mm256_setzero_ps(); ROWS];
        for b in 0..w.scales.len() {
            let wv = _mm256_loadu_si256(w.quants.as_ptr().add(b * QK) as *const __m256i);
            let aw = _mm256_sign_epi8(wv, wv);
            let dw = *w.scales.get_unchecked(b);
            for (a, x) in acc.iter_mut().zip(&xs[..n]) {
                let xv = _mm256_loadu_si256(x.quants.as_ptr().add(b * QK) as *const __m256i);
                let sums = block_dot(aw, _mm256_sign_epi8(xv, wv));
                let scale = _mm256_set1_ps(dw * *x.scales.get_unchecked(b));
                *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc).take(n) {
            *o = hsum(*a);
        }
    }

    /// Dequantization, eight values per instruction.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequantize_avx2(quants: &[i8], scales: &[f32], out: &mut [f32]) {
        let blocks = scales.len().min(quants.len() / QK).min(out.len() / QK);
        for (b, &scale) in scales.iter().enumerate().take(blocks) {
            let d = _mm256_set1_ps(scale);
            for j in (0..QK).step_by(8) {
                let at = b * QK + j;
                let q8 = _mm_loadl_epi64(quants.as_ptr().add(at) as *const __m128i);
                let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                _mm256_storeu_ps(out.as_mut_ptr().add(at), _mm256_mul_ps(d, v));
            }
        }
    }

    /// 32 bytes of `0x10` where block `b`'s fifth bit of that value is set, else 0: each byte
    /// takes the `u32`'s byte that holds its bit (byte `i` of the result bit `i`), keeps that
    /// bit, and compares.
    #[inline(always)]
    unsafe fn fifth_bits_x16(high: &[u8], b: usize) -> __m256i {
        let at = b * super::super::q4::HIGH_BYTES;
        let bits = std::ptr::read_unaligned(high.as_ptr().add(at) as *const i32);
        #[rustfmt::skip]
        let which_byte = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), which_byte);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Block `b`'s 32 unsigned values as bytes: low nibbles are values 0..16, high nibbles
    /// 16..32, and, when `FIVE`, their fifth bits.
    #[inline(always)]
    unsafe fn block_q4<const FIVE: bool>(w: super::super::q4::Q4Row<'_>, b: usize) -> __m256i {
        let low = _mm_set1_epi8(0x0F);
        let raw = _mm_loadu_si128(w.nibbles.as_ptr().add(b * QK / 2) as *const __m128i);
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        let qw = _mm256_set_m128i(hi, lo);
        if FIVE {
            _mm256_or_si256(qw, fifth_bits_x16(w.high, b))
        } else {
            qw
        }
    }

    /// The 4- and 5-bit loop: 32 weights unpacked from 16 bytes ([`block_q4`]);
    /// `block_dot(q_w, x)` multiplies the unsigned values (at most 31) by the signed
    /// activations directly (no sign trick needed), the offset term is added per block. For per-block scales (`Q4_0`, `Q4_1`,
    /// `Q5_0`, `Q5_1`); k-quant super-blocks go to [`dot_q4_super`].
    #[inline(always)]
    unsafe fn dot_q4_with<const FIVE: bool>(
        w: super::super::q4::Q4Row<'_>,
        xs: &[super::ActRow<'_>],
        out: &mut [f32],
        block_dot: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        use super::super::q4::RowScales;
        let n = xs.len().min(ROWS);
        let mut acc = [_mm256_setzero_ps(); ROWS];
        let mut offsets = [0f32; ROWS];
        // One loop, no closure: a closure is compiled without the caller's target features
        // and the intrinsics in it became calls (decode on the 1.5B Qwen file fell from 8 to
        // 1.6 tokens/s on an AVX2 machine, `perf` showing `_mm256_fmadd_ps` as a function).
        for b in 0..w.scales.blocks() {
            let (dw, mw) = match w.scales {
                RowScales::Centered { d, offset } => {
                    let db = *d.get_unchecked(b);
                    (db, offset * db)
                }
                RowScales::Block { d, m } => (*d.get_unchecked(b), *m.get_unchecked(b)),
                // `dot_q4_super`'s (not sent here by `dot_q4`), read as any block's.
                RowScales::Super { .. } => w.scales.of(b),
            };
            let qw = block_q4::<FIVE>(w, b);
            for ((a, off), x) in acc.iter_mut().zip(offsets.iter_mut()).zip(&xs[..n]) {
                let xv = _mm256_loadu_si256(x.row.quants.as_ptr().add(b * QK) as *const __m256i);
                let sums = block_dot(qw, xv);
                let scale = _mm256_set1_ps(dw * *x.row.scales.get_unchecked(b));
                *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), *a);
                *off += mw * *x.sums.get_unchecked(b);
            }
        }
        for ((o, a), off) in out.iter_mut().zip(&acc).zip(&offsets).take(n) {
            *o = hsum(*a) + off;
        }
    }

    /// AVX2 4- or 5-bit: `vpmaddubsw` (at most 31·127·2 per pair: no saturation) then
    /// `vpmaddwd`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4_avx2<const FIVE: bool>(
        w: super::super::q4::Q4Row<'_>,
        xs: &[super::ActRow<'_>],
        out: &mut [f32],
    ) {
        let ones = _mm256_set1_epi16(1);
        dot_q4_with::<FIVE>(w, xs, out, |q, x| {
            _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones)
        });
    }

    /// AVX-VNNI 4- or 5-bit: one `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn dot_q4_vnni<const FIVE: bool>(
        w: super::super::q4::Q4Row<'_>,
        xs: &[super::ActRow<'_>],
        out: &mut [f32],
    ) {
        dot_q4_with::<FIVE>(w, xs, out, |q, x| {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, x)
        });
    }

    /// The scales of a row of k-quant super-blocks ([`super::super::q4::RowScales::Super`]).
    pub(super) struct SuperScales<'a> {
        pub d: &'a [f32],
        pub dmin: &'a [f32],
        pub sc: &'a [u8],
        pub mn: &'a [u8],
    }

    /// `Q4_K` and `Q5_K` against activations with one scale per super-block (`Q8_K`-style,
    /// as llama.cpp's `ggml_vec_dot_q4_K_q8_K`): a block's 32 products go through
    /// `vpmaddubsw` into `i16` pairs (at most 31·127·2: no saturation), `vpmaddwd` multiplies
    /// them by the block's 6-bit `sc` and adds the pairs, and the eight blocks' `i32` lanes
    /// add up exactly (at most 8·2·7874·63 < 2³¹); per super-block one conversion to `f32`
    /// scaled by `d·d_x`, and one multiply-add of eight lanes for the offsets
    /// `−dmin·mn[b]·(d_x·Σq_x)`. Per block that is four vector instructions per activation
    /// row where the per-block loop of [`dot_q4_with`] needs a scalar product, a broadcast,
    /// a conversion and a float multiply-add besides.
    ///
    /// The row count is a constant of each instance ([`q4_super_rows`]), so the loops over
    /// rows unroll and the accumulators stay in registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q4_super<const FIVE: bool>(
        w: super::super::q4::Q4Row<'_>,
        scales: SuperScales<'_>,
        xs: &[super::ActRow<'_>],
        out: &mut [f32],
    ) {
        with_row_count!(xs.len(), ROWS, |R| q4_super_rows::<FIVE, R>(
            w, &scales, xs, out
        ))
    }

    /// [`dot_q4_super`] for the first `N` rows of `xs`.
    #[inline(always)]
    unsafe fn q4_super_rows<const FIVE: bool, const N: usize>(
        w: super::super::q4::Q4Row<'_>,
        scales: &SuperScales<'_>,
        xs: &[super::ActRow<'_>],
        out: &mut [f32],
    ) {
        use super::super::q4::SUB_BLOCKS;
        let xs = &xs[..N];
        let mut acc = [_mm256_setzero_ps(); N];
        for s in 0..scales.d.len() {
            let mut isum = [_mm256_setzero_si256(); N];
            for k in 0..SUB_BLOCKS {
                let b = s * SUB_BLOCKS + k;
                let qw = block_q4::<FIVE>(w, b);
                let sc = _mm256_set1_epi16(*scales.sc.get_unchecked(b) as i16);
                for (sum, x) in isum.iter_mut().zip(xs) {
                    let xv =
                        _mm256_loadu_si256(x.row.quants.as_ptr().add(b * QK) as *const __m256i);
                    let pairs = _mm256_maddubs_epi16(qw, xv);
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, sc));
                }
            }
            let first = s * SUB_BLOCKS;
            let d = *scales.d.get_unchecked(s);
            // −(dmin·mn[b]) per block, as the scalar offset is: negation is exact.
            let mn = _mm_loadl_epi64(scales.mn.as_ptr().add(first) as *const __m128i);
            let mins = _mm256_mul_ps(
                _mm256_set1_ps(-*scales.dmin.get_unchecked(s)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)),
            );
            for ((a, sum), x) in acc.iter_mut().zip(&isum).zip(xs) {
                let scale = _mm256_set1_ps(d * *x.row.scales.get_unchecked(first));
                *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(*sum), *a);
                let sums = _mm256_loadu_ps(x.sums.as_ptr().add(first));
                *a = _mm256_fmadd_ps(mins, sums, *a);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = hsum(*a);
        }
    }

    /// `Q6_K` against activations with one scale per super-block (`Q8_K`-style). Per half
    /// super-block one 32-byte load of `qh` serves four blocks, each of which takes its
    /// nibbles from one of two 32-byte loads of `ql`. The values `q − 32` are signed, so the
    /// product uses the sign trick of [`dot_with`] through `vpmaddubsw` (at most 32·127·2 per
    /// pair); `vpmaddwd` multiplies the pairs of values 0..16 by their part's signed `sc` and
    /// those of 16..32 by the next one's, and the sixteen parts' `i32` lanes add up exactly
    /// (at most 8·2·8128·128 < 2³¹); per super-block one conversion to `f32` scaled by `d·d_x`.
    /// As [`dot_q4_super`], one instance per row count ([`q6_super_rows`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q6_super(w: &[u8], xs: &[super::ActRow<'_>], out: &mut [f32]) {
        with_row_count!(xs.len(), ROWS, |R| q6_super_rows::<R>(w, xs, out))
    }

    /// [`dot_q6_super`] for the first `N` rows of `xs`.
    #[inline(always)]
    unsafe fn q6_super_rows<const N: usize>(w: &[u8], xs: &[super::ActRow<'_>], out: &mut [f32]) {
        use super::super::q6::BLOCK_BYTES;
        let xs = &xs[..N];
        let bias = _mm256_set1_epi8(32);
        let mut acc = [_mm256_setzero_ps(); N];
        for s in 0..w.len() / BLOCK_BYTES {
            let sb = w.as_ptr().add(s * BLOCK_BYTES);
            let mut isum = [_mm256_setzero_si256(); N];
            for half in 0..2 {
                let values = q6_half(sb, half);
                for (k, &v) in values.iter().enumerate() {
                    let b = s * 8 + half * 4 + k;
                    let q = _mm256_sub_epi8(v, bias);
                    let aq = _mm256_sign_epi8(q, q);
                    let j = 2 * (half * 4 + k);
                    // Values 0..16 are the low 128 bits of the pairs, 16..32 the high ones.
                    let sc = _mm256_set_m128i(
                        _mm_set1_epi16(*(sb.add(192 + j + 1) as *const i8) as i16),
                        _mm_set1_epi16(*(sb.add(192 + j) as *const i8) as i16),
                    );
                    for (sum, x) in isum.iter_mut().zip(xs) {
                        let xv =
                            _mm256_loadu_si256(x.row.quants.as_ptr().add(b * QK) as *const __m256i);
                        let pairs = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv, q));
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, sc));
                    }
                }
            }
            let d = crate::model::gguf::f16_at(w.get_unchecked(s * BLOCK_BYTES..), 208);
            for ((a, sum), x) in acc.iter_mut().zip(&isum).zip(xs) {
                let scale = _mm256_set1_ps(d * *x.row.scales.get_unchecked(s * 8));
                *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(*sum), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = hsum(*a);
        }
    }

    /// Half `half` (0 or 1) of the `Q6_K` super-block at `sb`: its four blocks' raw 6-bit
    /// values (0..64, before `− 32`), block `k` from the low (`k` < 2) or high nibbles of
    /// `ql[32·(k % 2)..][..32]` and bits `2k, 2k + 1` of `qh[..32]` (see `q6`'s doc).
    #[inline(always)]
    unsafe fn q6_half(sb: *const u8, half: usize) -> [__m256i; 4] {
        let (nib, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
        let ql0 = _mm256_loadu_si256(sb.add(64 * half) as *const __m256i);
        let ql1 = _mm256_loadu_si256(sb.add(64 * half + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(sb.add(128 + 32 * half) as *const __m256i);
        let lows = [
            _mm256_and_si256(ql0, nib),
            _mm256_and_si256(ql1, nib),
            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), nib),
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), nib),
        ];
        let highs = [
            qh,
            _mm256_srli_epi16(qh, 2),
            _mm256_srli_epi16(qh, 4),
            _mm256_srli_epi16(qh, 6),
        ];
        let mut out = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            let high = _mm256_slli_epi16(_mm256_and_si256(highs[k], two), 4);
            out[k] = _mm256_or_si256(lows[k], high);
        }
        out
    }

    /// [`super::unpack_q6`] on AVX2: 32 values per store.
    ///
    /// # Safety
    /// The CPU has AVX2; `out.len() == w.len() / BLOCK_BYTES × 256`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpack_q6(w: &[u8], out: &mut [u8]) {
        use super::super::q6::BLOCK_BYTES;
        for s in 0..w.len() / BLOCK_BYTES {
            let sb = w.as_ptr().add(s * BLOCK_BYTES);
            for half in 0..2 {
                for (k, v) in q6_half(sb, half).iter().enumerate() {
                    let b = s * 8 + half * 4 + k;
                    _mm256_storeu_si256(out.as_mut_ptr().add(b * QK) as *mut __m256i, *v);
                }
            }
        }
    }

    /// [`super::unpack_q4`] on AVX2: one block per store.
    ///
    /// # Safety
    /// The CPU has AVX2; the row's lengths fit its blocks and `out` (checked by the caller).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpack_q4<const FIVE: bool>(
        w: super::super::q4::Q4Row<'_>,
        out: &mut [u8],
    ) {
        for b in 0..w.scales.blocks() {
            let v = block_q4::<FIVE>(w, b);
            _mm256_storeu_si256(out.as_mut_ptr().add(b * QK) as *mut __m256i, v);
        }
    }

    /// AVX2: `vpmaddubsw` then `vpmaddwd` against ones.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(w: RowRef<'_>, xs: &[RowRef<'_>], out: &mut [f32]) {
        let ones = _mm256_set1_epi16(1);
        dot_with(w, xs, out, |a, s| {
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, s), ones)
        });
    }

    /// AVX-VNNI: one `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn dot_vnni(w: RowRef<'_>, xs: &[RowRef<'_>], out: &mut [f32]) {
        dot_with(w, xs, out, |a, s| {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, s)
        });
    }

    /// Blocks `b` and `b + 1`'s scales, each in eight lanes: `[s_b ×8, s_{b+1} ×8]`.
    #[inline(always)]
    unsafe fn two_scales(scales: *const f32) -> __m512 {
        let pair = _mm_castpd_ps(_mm_load_sd(scales as *const f64));
        let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(pair))
    }

    /// Blocks `b` and `b + 1` of a 4- or 5-bit row as 64 unsigned bytes, block `b`'s values
    /// 0..32 first: the 32 nibble bytes of both split into low and high halves, the 128-bit
    /// lanes put in value order, and, when `FIVE`, 16 added where the two blocks' fifth bits
    /// (one little-endian `u64`, bit `j` for value `j`) are set: a mask register, one add.
    #[inline(always)]
    unsafe fn two_blocks_q4<const FIVE: bool>(
        w: &super::super::q4::Q4Row<'_>,
        b: usize,
    ) -> __m512i {
        let low = _mm256_set1_epi8(0x0F);
        let raw = _mm256_loadu_si256(w.nibbles.as_ptr().add(b * QK / 2) as *const __m256i);
        let lo = _mm256_and_si256(raw, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        // Lanes [lo_b, lo_b+1, hi_b, hi_b+1] -> [lo_b, hi_b, lo_b+1, hi_b+1].
        let v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        let v = _mm512_shuffle_i64x2(v, v, 0b11_01_10_00);
        if FIVE {
            let at = b * super::super::q4::HIGH_BYTES;
            let bits = std::ptr::read_unaligned(w.high.as_ptr().add(at) as *const u64);
            _mm512_mask_add_epi8(v, bits, v, _mm512_set1_epi8(0x10))
        } else {
            v
        }
    }

    /// `W` per-block 4- or 5-bit weight rows (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`) against up to
    /// [`ROWS`] activation rows, two blocks per step: `vpdpbusd` of the 64 unsigned weight
    /// values by the 64 signed activations into sixteen `i32` lanes (eight per block), one
    /// conversion, and one multiply-add by the two blocks' `d_w·d_x` side by side. An odd last
    /// block takes the 256-bit step. The offsets `m_w·(d_x·Σq_x)` are summed after the loop.
    /// Each activation block is loaded once for the `W` weight rows, each weight block
    /// unpacked once for the activation rows.
    ///
    /// # Safety
    /// The CPU has the features enabled; the rows passed `check_q4_rows`, and their scales
    /// are per block (`Centered` or `Block`).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_q4_512<const W: usize>(
        w: &[super::super::q4::Q4Row<'_>; W],
        xs: &[super::ActRow<'_>],
        out: &mut [[f32; ROWS]; W],
    ) {
        let five = !w[0].high.is_empty();
        match (xs.len(), five) {
            (0, _) => {}
            (1, false) => q4_512::<false, W, 1>(w, xs, out),
            (2, false) => q4_512::<false, W, 2>(w, xs, out),
            (3, false) => q4_512::<false, W, 3>(w, xs, out),
            (_, false) => q4_512::<false, W, ROWS>(w, xs, out),
            (1, true) => q4_512::<true, W, 1>(w, xs, out),
            (2, true) => q4_512::<true, W, 2>(w, xs, out),
            (3, true) => q4_512::<true, W, 3>(w, xs, out),
            (_, true) => q4_512::<true, W, ROWS>(w, xs, out),
        }
    }

    /// [`dot_q4_512`] for `N` activation rows.
    #[inline(always)]
    unsafe fn q4_512<const FIVE: bool, const W: usize, const N: usize>(
        w: &[super::super::q4::Q4Row<'_>; W],
        xs: &[super::ActRow<'_>],
        out: &mut [[f32; ROWS]; W],
    ) {
        use super::super::q4::RowScales;
        let xs = &xs[..N];
        let mut pairs = [Q4Blocks::<FIVE> { row: w[0], d: &[] }; W];
        for (p, w) in pairs.iter_mut().zip(w) {
            p.row = *w;
            p.d = match w.scales {
                RowScales::Centered { d, .. } | RowScales::Block { d, .. } => d,
                RowScales::Super { .. } => &[],
            };
        }
        let mut rows = [xs[0].row; N];
        for (r, x) in rows.iter_mut().zip(xs) {
            *r = x.row;
        }
        let dots = block_pairs_512(&pairs, &rows, w[0].scales.blocks());
        for i in 0..W {
            for (r, x) in xs.iter().enumerate() {
                // Block by block in order, each `m_w` as `RowScales::of` gives it: the same
                // rounding as the 256-bit kernels, so every x86 kernel gives the same offsets.
                let mut offset = 0f32;
                match w[i].scales {
                    RowScales::Centered { d, offset: o } => {
                        for (&d, &s) in d.iter().zip(x.sums) {
                            offset += o * d * s;
                        }
                    }
                    RowScales::Block { m, .. } => {
                        for (&m, &s) in m.iter().zip(x.sums) {
                            offset += m * s;
                        }
                    }
                    RowScales::Super { .. } => {}
                }
                out[i][r] = dots[i][r] + offset;
            }
        }
    }

    /// `W` rows of 8-bit blocks (`Q8_0`, and the 8-bit repacking of other types) against up
    /// to [`ROWS`] activation rows, two blocks per step as [`dot_q4_512`], with the sign trick
    /// of [`dot_with`]: `|w|` unsigned, the activations negated where `w` is negative (a mask
    /// from `w`'s sign bits, one masked subtraction per activation row).
    ///
    /// # Safety
    /// The CPU has the features enabled; the rows passed `check_rows`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_q8_512<const W: usize>(
        w: &[RowRef<'_>; W],
        xs: &[RowRef<'_>],
        out: &mut [[f32; ROWS]; W],
    ) {
        with_row_count!(xs.len(), ROWS, |R| q8_512::<W, R>(w, xs, out))
    }

    /// [`dot_q8_512`] for `N` activation rows.
    #[inline(always)]
    unsafe fn q8_512<const W: usize, const N: usize>(
        w: &[RowRef<'_>; W],
        xs: &[RowRef<'_>],
        out: &mut [[f32; ROWS]; W],
    ) {
        let mut rows = [xs[0]; N];
        rows.copy_from_slice(&xs[..N]);
        let dots = block_pairs_512(w, &rows, w[0].scales.len());
        for i in 0..W {
            out[i][..N].copy_from_slice(&dots[i]);
        }
    }

    /// A weight row as the 512-bit per-block kernels read it: two blocks at a time as 64
    /// unsigned bytes with their scales side by side, or one block as 32 (an odd last one).
    /// Signed weights (`SIGNED`) are given as `|w|` and the activations negated where `w` is
    /// negative (the sign trick of [`dot_with`]).
    trait BlockPairs: Copy {
        /// Whether the weights are signed (the activations take their signs).
        const SIGNED: bool;
        /// Blocks `b` and `b + 1`: the unsigned values, the mask of negative weights (`SIGNED`
        /// only), and the two scales, eight lanes each ([`two_scales`]).
        unsafe fn pair(&self, b: usize) -> (__m512i, __mmask64, __m512);
        /// Block `b` alone: the unsigned values, the signed ones whose signs the activations
        /// take (`SIGNED` only), and its scale.
        unsafe fn single(&self, b: usize) -> (__m256i, __m256i, f32);
    }

    /// A per-block 4- or 5-bit row ([`two_blocks_q4`], [`block_q4`]) and its scales.
    #[derive(Clone, Copy)]
    struct Q4Blocks<'a, const FIVE: bool> {
        row: super::super::q4::Q4Row<'a>,
        d: &'a [f32],
    }

    impl<const FIVE: bool> BlockPairs for Q4Blocks<'_, FIVE> {
        const SIGNED: bool = false;

        #[inline(always)]
        unsafe fn pair(&self, b: usize) -> (__m512i, __mmask64, __m512) {
            let q = two_blocks_q4::<FIVE>(&self.row, b);
            (q, 0, two_scales(self.d.as_ptr().add(b)))
        }

        #[inline(always)]
        unsafe fn single(&self, b: usize) -> (__m256i, __m256i, f32) {
            let q = block_q4::<FIVE>(self.row, b);
            (q, q, *self.d.get_unchecked(b))
        }
    }

    impl BlockPairs for RowRef<'_> {
        const SIGNED: bool = true;

        #[inline(always)]
        unsafe fn pair(&self, b: usize) -> (__m512i, __mmask64, __m512) {
            let wv = _mm512_loadu_si512(self.quants.as_ptr().add(b * QK) as *const __m512i);
            let scales = two_scales(self.scales.as_ptr().add(b));
            (_mm512_abs_epi8(wv), _mm512_movepi8_mask(wv), scales)
        }

        #[inline(always)]
        unsafe fn single(&self, b: usize) -> (__m256i, __m256i, f32) {
            let wv = _mm256_loadu_si256(self.quants.as_ptr().add(b * QK) as *const __m256i);
            (_mm256_sign_epi8(wv, wv), wv, *self.scales.get_unchecked(b))
        }
    }

    /// `out[i][r] = Σ_b d_w·d_x·(w[i] · xs[r])` over `blocks` blocks, shared by [`dot_q4_512`]
    /// and [`dot_q8_512`]: two blocks per step, `vpdpbusd` of the 64 unsigned weight values by
    /// the 64 signed activations into sixteen `i32` lanes (eight per block), one conversion,
    /// and one multiply-add by the two blocks' `d_w·d_x` side by side; an odd last block takes
    /// the 256-bit step. Each activation block is loaded once for the `W` weight rows, each
    /// weight block prepared once for the `N` activation rows.
    #[inline(always)]
    unsafe fn block_pairs_512<R: BlockPairs, const W: usize, const N: usize>(
        w: &[R; W],
        xs: &[RowRef<'_>; N],
        blocks: usize,
    ) -> [[f32; N]; W] {
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm512_setzero_ps(); N]; W];
        for b in (0..blocks & !1).step_by(2) {
            let mut q = [zero; W];
            let mut neg = [0 as __mmask64; W];
            let mut dw = [_mm512_setzero_ps(); W];
            for i in 0..W {
                (q[i], neg[i], dw[i]) = w[i].pair(b);
            }
            for (r, x) in xs.iter().enumerate() {
                let xv = _mm512_loadu_si512(x.quants.as_ptr().add(b * QK) as *const __m512i);
                let dx = two_scales(x.scales.as_ptr().add(b));
                for i in 0..W {
                    let signed = if R::SIGNED {
                        _mm512_mask_sub_epi8(xv, neg[i], zero, xv)
                    } else {
                        xv
                    };
                    let sums = _mm512_dpbusd_epi32(zero, q[i], signed);
                    let scale = _mm512_mul_ps(dw[i], dx);
                    acc[i][r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[i][r]);
                }
            }
        }
        let mut tail = [[_mm256_setzero_ps(); N]; W];
        if blocks % 2 == 1 {
            let b = blocks - 1;
            for i in 0..W {
                let (q, signs, dw) = w[i].single(b);
                for (r, x) in xs.iter().enumerate() {
                    let xv = _mm256_loadu_si256(x.quants.as_ptr().add(b * QK) as *const __m256i);
                    let signed = if R::SIGNED {
                        _mm256_sign_epi8(xv, signs)
                    } else {
                        xv
                    };
                    let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, signed);
                    let scale = _mm256_set1_ps(dw * *x.scales.get_unchecked(b));
                    tail[i][r] = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(sums));
                }
            }
        }
        let mut out = [[0f32; N]; W];
        for i in 0..W {
            for r in 0..N {
                out[i][r] = _mm512_reduce_add_ps(acc[i][r]) + hsum(tail[i][r]);
            }
        }
        out
    }
}
