//! Integer GEMM over packed panels of weight rows: the product of many activation rows (a
//! prompt's prefill, a large decode batch) on AVX-512 VNNI.
//!
//! The dot kernels ([`super::kernels`]) multiply one weight row by a few activation rows, so
//! each `vpdpbusd` gives eight partial sums of one block and every block then pays a
//! conversion, a scale product and a float multiply-add per pair of rows: about as many
//! instructions per multiply as an f32 GEMM. Here the lanes are output columns instead. A
//! `Panel` holds [`PANEL`] weight rows with their values interleaved four at a time
//! (`values[(q·PANEL + c)·4 + t]` is row `c`'s value `4q + t`, as an unsigned byte), so one
//! `vpdpbusd` of a 16-row register by four activation bytes broadcast to every lane adds 64
//! products into the 16 columns' sums, and a block's scales are applied once per 16 columns
//! (the layout of llama.cpp's repacked `Q4_0` 8x8 GEMM and of oneDNN's VNNI GEMM, chosen for
//! the same reason). The panel is packed from the matrix's own blocks when the product needs
//! it (a panel of 32 rows is used by every activation row of the product), so the weights stay
//! in their compact form in memory.
//!
//! Every format becomes unsigned bytes `u` with `v = d·(u − zero) + m` per step of values
//! ([`PanelFormat`]): `Q8_0` as `q + 128` (zero 128), the 4- and 5-bit formats as their
//! unsigned values (zero 0, each block's offset `m` times the activations' block sums, as the
//! dot kernels do), `Q6_K` as its raw 6-bit values (zero 32, a scale per 16 values). The zero
//! point is subtracted exactly in integers: each step's sum starts at `−zero·Σq_x`.

use super::arena::Buf;
use super::{Activations, BlockWeights, QK};

/// Weight rows (output columns) per packed panel: two 16-lane registers.
pub const PANEL: usize = 32;

/// Activation rows one call of the micro-kernel multiplies against a panel.
pub(super) const TILE_ROWS: usize = 4;

/// How a matrix's rows unpack for the panels ([`BlockWeights::unpack_row`]): every value is
/// `v = d·(u − zero) + m`, `u` an unsigned byte, `d` one scale per `step` values and `m` (when
/// `offsets`) one offset per block of [`QK`] values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PanelFormat {
    /// Values per scale: [`QK`], or 16 (`Q6_K`'s scale per half block).
    pub step: usize,
    /// Subtracted from every unpacked value before its scale.
    pub zero: i32,
    /// Whether each block has an offset `m`.
    pub offsets: bool,
}

/// [`PANEL`] weight rows packed for the micro-kernel (reused across products by each thread).
#[derive(Default, Clone)]
pub(super) struct Panel {
    format: Option<PanelFormat>,
    /// `k / 4` groups of four values, each `PANEL × 4` bytes (see the module's doc).
    values: Buf<u8>,
    /// Per step of `format.step` values, `PANEL` scales.
    scales: Buf<f32>,
    /// Per block, `PANEL` offsets (empty without offsets).
    offsets: Buf<f32>,
}

/// The rows of a panel unpacked before they are interleaved: `PANEL` rows' values, one row's
/// scales per step and offsets per block.
pub(super) type Unpacked = (Vec<u8>, Vec<f32>, Vec<f32>);

impl Panel {
    /// Packs weight rows `rows` (at most [`PANEL`]; the panel's other columns get scale 0)
    /// of a matrix of `blocks` blocks per row: each row unpacked whole, then the 32 rows'
    /// values interleaved four bytes at a time.
    pub(super) fn pack<W: BlockWeights>(
        &mut self,
        w: &W,
        rows: std::ops::Range<usize>,
        blocks: usize,
        scratch: &mut Unpacked,
    ) {
        let format = w.panel_format();
        let k = blocks * QK;
        let steps = k / format.step;
        let block_offsets = if format.offsets { blocks } else { 0 };
        self.format = Some(format);
        // Unused columns keep whatever values they had (any byte times scale 0 is 0); only
        // their scales and offsets are cleared.
        self.values.vec_mut().resize(k * PANEL, 0);
        self.scales.vec_mut().clear();
        self.scales.vec_mut().resize(steps * PANEL, 0.0);
        self.offsets.vec_mut().clear();
        self.offsets.vec_mut().resize(block_offsets * PANEL, 0.0);
        let (values, scales, offsets) = scratch;
        values.resize(k * PANEL, 0);
        scales.resize(steps, 0.0);
        offsets.resize(block_offsets, 0.0);
        for (c, r) in rows.enumerate().take(PANEL) {
            w.unpack_row(r, &mut values[c * k..(c + 1) * k], scales, offsets);
            for (s, &d) in scales.iter().enumerate() {
                self.scales[s * PANEL + c] = d;
            }
            for (b, &m) in offsets.iter().enumerate() {
                self.offsets[b * PANEL + c] = m;
            }
        }
        interleave(values, k, &mut self.values);
    }
}

impl Panel {
    /// Fills the panel for `k` values a row in `format` through `fill(values, scales,
    /// offsets)`, given buffers of the panel's layout (`k × PANEL` values, `PANEL` scales per
    /// step, `PANEL` offsets per block when `format.offsets`): how weights kept in panels of
    /// their own ([`super::Q4kPanels`]) unpack into this kernel's.
    pub(super) fn fill(
        &mut self,
        format: PanelFormat,
        k: usize,
        fill: impl FnOnce(&mut [u8], &mut [f32], &mut [f32]),
    ) {
        self.format = Some(format);
        self.values.vec_mut().resize(k * PANEL, 0);
        self.scales.vec_mut().resize(k / format.step * PANEL, 0.0);
        let offsets = if format.offsets { k / QK * PANEL } else { 0 };
        self.offsets.vec_mut().resize(offsets, 0.0);
        fill(&mut self.values, &mut self.scales, &mut self.offsets);
    }

    /// Row `c`'s value `v` as the kernel reads it: its unsigned byte and the scale of its step
    /// (what a panel kept as a matrix's storage dequantizes from).
    pub(super) fn value(&self, c: usize, v: usize) -> (u8, f32) {
        let step = self.format.map_or(QK, |f| f.step);
        (
            self.values[((v / 4) * PANEL + c) * 4 + v % 4],
            self.scales[(v / step) * PANEL + c],
        )
    }

    /// Moves the panel's values, scales and offsets into `arena` (a panel kept as a matrix's
    /// storage, [`super::Q8Panels`]).
    pub(super) fn place_in(&mut self, arena: &super::arena::WeightArena) {
        arena.place(&mut self.values);
        arena.place(&mut self.scales);
        arena.place(&mut self.offsets);
    }

    /// Whether the panel's buffers are in an arena.
    pub(super) fn placed(&self) -> bool {
        self.values.placed() && self.scales.placed() && self.offsets.placed()
    }

    /// Bytes of the panel's values, scales and offsets.
    pub(super) fn bytes(&self) -> usize {
        self.values.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    /// `out[i][c]` = activation row `rows.start + i` times the panel's row `c`
    /// (`rows.len() ≤ TILE_ROWS`).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and VNNI ([`supported`]); the panel holds as many values
    /// a row as the activations.
    pub(super) unsafe fn multiply(
        &self,
        xs: &PanelActivations<'_>,
        rows: std::ops::Range<usize>,
        out: &mut [[f32; PANEL]; TILE_ROWS],
    ) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's.
        unsafe {
            x86::tile(self, xs, rows, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (xs, rows, out);
    }
}

/// `out[(q·PANEL + c)·4 + t] = rows[c·k + 4q + t]`: [`PANEL`] rows of `k` bytes (a multiple of
/// [`QK`]) interleaved four bytes at a time.
fn interleave(rows: &[u8], k: usize, out: &mut [u8]) {
    assert!(
        k.is_multiple_of(QK) && rows.len() == k * PANEL && out.len() == k * PANEL,
        "panels::interleave: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above), the lengths just above.
        unsafe { x86::interleave(rows, k, out) };
        return;
    }
    for c in 0..PANEL {
        for (q, four) in rows[c * k..(c + 1) * k].chunks_exact(4).enumerate() {
            let at = (q * PANEL + c) * 4;
            out[at..at + 4].copy_from_slice(four);
        }
    }
}

/// Whether `kernel` multiplies through panels (the AVX-512 VNNI machines).
pub fn supported(kernel: super::Kernel) -> bool {
    matches!(kernel, super::Kernel::Avx512Vnni)
}

/// The activation rows of a product as the micro-kernel reads them, with each step's sum of
/// quantized values when the weights have a zero point.
pub(super) struct PanelActivations<'a> {
    x: &'a Activations,
    /// `m × steps` sums `Σq_x` of each step's values (empty when the zero point is 0).
    step_sums: Vec<i32>,
    steps: usize,
}

impl<'a> PanelActivations<'a> {
    /// `x` for weights of format `format`.
    pub(super) fn new(x: &'a Activations, format: PanelFormat) -> Self {
        let steps = x.q.blocks * QK / format.step;
        let step_sums = if format.zero != 0 {
            x.q.quants
                .chunks_exact(format.step)
                .map(|s| s.iter().map(|&v| v as i32).sum())
                .collect()
        } else {
            Vec::new()
        };
        PanelActivations {
            x,
            step_sums,
            steps,
        }
    }
}

/// Packed panels of one run kept at most this size, so they stay in cache while every chunk
/// of activation rows passes over them.
const PACKED_BYTES: usize = 2 << 20;

/// Activation rows of one chunk take about this many bytes (but at least [`CHUNK_MIN_ROWS`]
/// rows), so a chunk stays in cache while the packed panels pass over it.
const CHUNK_BYTES: usize = 512 << 10;

/// Rows of the smallest chunk: fewer passes over the panels for wide rows (`ffn_down`'s
/// 8960 values), where 32-row chunks measured slower than one pass of 128 rows.
const CHUNK_MIN_ROWS: usize = 256;

/// Output columns `cols` of `y` `[m, n]` through panels: the run's weight rows packed a group
/// of panels at a time (once each), and every chunk of activation rows multiplied against the
/// group's panels, a tile of [`TILE_ROWS`] rows per call. For a few hundred rows or fewer there
/// is one chunk; a long prefill (thousands of rows, megabytes of activations) is taken in
/// chunks so neither side is read from memory once per panel.
///
/// # Safety
/// `y` points to `m × w.rows()` values, of which no other thread touches columns `cols`;
/// `supported(kernel)` for the kernel that chose this path (the CPU has AVX-512 VNNI).
pub(super) unsafe fn columns_by_panels<W: BlockWeights>(
    w: &W,
    xs: &PanelActivations<'_>,
    cols: std::ops::Range<usize>,
    y: *mut f32,
) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<Panel>, Unpacked)> =
            std::cell::RefCell::new(Default::default());
    }
    let (m, n, blocks) = (xs.x.q.rows, w.rows(), xs.x.q.blocks);
    let k = (blocks * QK).max(1);
    let group = (PACKED_BYTES / (k * PANEL)).max(1);
    let chunk = (CHUNK_BYTES / k)
        .max(CHUNK_MIN_ROWS)
        .next_multiple_of(TILE_ROWS);
    let starts: Vec<usize> = cols.clone().step_by(PANEL).collect();
    SCRATCH.with_borrow_mut(|(panels, unpacked)| {
        for starts in starts.chunks(group) {
            if panels.len() < starts.len() {
                panels.resize_with(starts.len(), Panel::default);
            }
            for (panel, &c0) in panels.iter_mut().zip(starts) {
                panel.pack(w, c0..(c0 + PANEL).min(cols.end), blocks, unpacked);
            }
            let mut out = [[0f32; PANEL]; TILE_ROWS];
            for chunk0 in (0..m).step_by(chunk) {
                let chunk1 = (chunk0 + chunk).min(m);
                for (panel, &c0) in panels.iter().zip(starts) {
                    let c1 = (c0 + PANEL).min(cols.end);
                    for r0 in (chunk0..chunk1).step_by(TILE_ROWS) {
                        let r1 = (r0 + TILE_ROWS).min(chunk1);
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: the caller's CPU has the features (`supported`); the panel
                        // and the activations hold `blocks` blocks per row.
                        unsafe {
                            x86::tile(panel, xs, r0..r1, &mut out)
                        };
                        for (i, row) in out.iter().enumerate().take(r1 - r0) {
                            for (c, &v) in row.iter().enumerate().take(c1 - c0) {
                                // SAFETY: the row is below m, the column in the caller's run.
                                unsafe { *y.add((r0 + i) * n + c0 + c) = v };
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Panel, PanelActivations, PANEL, QK, TILE_ROWS};

    use std::arch::x86_64::*;

    /// [`super::interleave`] on AVX2: per block, eight rows' 32 bytes (eight `u32` each) as
    /// an 8 x 8 transpose of `u32`s, so each store writes one group of four values of eight
    /// rows.
    ///
    /// # Safety
    /// The CPU has AVX2; `rows` and `out` hold `k × PANEL` bytes, `k` a multiple of 32.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interleave(rows: &[u8], k: usize, out: &mut [u8]) {
        let (src, dst) = (rows.as_ptr(), out.as_mut_ptr());
        for b in 0..k / QK {
            for c0 in (0..PANEL).step_by(8) {
                let mut r = [_mm256_setzero_si256(); 8];
                for (i, r) in r.iter_mut().enumerate() {
                    *r = _mm256_loadu_si256(src.add((c0 + i) * k + b * QK) as *const __m256i);
                }
                // Pairs of rows, then fours (written out: a closure would be compiled without
                // this function's AVX2). Lane halves hold groups g and g + 4.
                let mut t = [_mm256_setzero_si256(); 8];
                for p in 0..4 {
                    t[2 * p] = _mm256_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
                    t[2 * p + 1] = _mm256_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
                }
                // u[j] (rows 0..4) and u[4 + j] (rows 4..8): groups j and j + 4.
                let mut u = [_mm256_setzero_si256(); 8];
                for base in [0, 4] {
                    for h in 0..2 {
                        let (a, b) = (t[base + h], t[base + 2 + h]);
                        u[base + 2 * h] = _mm256_unpacklo_epi64(a, b);
                        u[base + 2 * h + 1] = _mm256_unpackhi_epi64(a, b);
                    }
                }
                for j in 0..4 {
                    let low = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
                    let high = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
                    let at = |g: usize| dst.add(((b * 8 + g) * PANEL + c0) * 4) as *mut __m256i;
                    _mm256_storeu_si256(at(j), low);
                    _mm256_storeu_si256(at(j + 4), high);
                }
            }
        }
    }

    /// `out[i][c] = Σ_k x[rows.start + i][k]·panel[c][k]` for the tile's activation rows.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; the panel was packed for the activations' blocks.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile(
        p: &Panel,
        xs: &PanelActivations<'_>,
        rows: std::ops::Range<usize>,
        out: &mut [[f32; PANEL]; TILE_ROWS],
    ) {
        let Some(format) = p.format else { return };
        let (n, r0) = (rows.len(), rows.start);
        match (format.step, format.offsets) {
            (16, _) => with_row_count!(n, TILE_ROWS, |R| tile_rows::<R, 16, false>(p, xs, r0, out)),
            (_, false) => {
                with_row_count!(n, TILE_ROWS, |R| tile_rows::<R, QK, false>(p, xs, r0, out))
            }
            (_, true) => {
                with_row_count!(n, TILE_ROWS, |R| tile_rows::<R, QK, true>(p, xs, r0, out))
            }
        }
    }

    /// [`tile`] for `R` rows from `r0`, steps of `STEP` values, with or without offsets.
    #[inline(always)]
    unsafe fn tile_rows<const R: usize, const STEP: usize, const OFFSETS: bool>(
        p: &Panel,
        xs: &PanelActivations<'_>,
        r0: usize,
        out: &mut [[f32; PANEL]; TILE_ROWS],
    ) {
        let x = xs.x;
        let blocks = x.q.blocks;
        let zero = p.format.map_or(0, |f| f.zero);
        let mut quants = [std::ptr::null::<i8>(); R];
        let mut scales = [std::ptr::null::<f32>(); R];
        let mut sums = [std::ptr::null::<f32>(); R];
        let mut step_sums = [std::ptr::null::<i32>(); R];
        for i in 0..R {
            let r = r0 + i;
            quants[i] = x.q.quants.as_ptr().add(r * blocks * QK);
            scales[i] = x.q.scales.as_ptr().add(r * blocks);
            if OFFSETS {
                sums[i] = x.sums.as_ptr().add(r * blocks);
            }
            if zero != 0 {
                step_sums[i] = xs.step_sums.as_ptr().add(r * xs.steps);
            }
        }
        let values = p.values.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for s in 0..xs.steps {
            let mut isum = [[_mm512_setzero_si512(); 2]; R];
            if zero != 0 {
                for i in 0..R {
                    let z = _mm512_set1_epi32(-zero * *step_sums[i].add(s));
                    isum[i] = [z, z];
                }
            }
            for g in 0..STEP / 4 {
                let q = s * (STEP / 4) + g;
                let w0 = _mm512_loadu_si512(values.add(q * PANEL * 4) as *const __m512i);
                let w1 = _mm512_loadu_si512(values.add(q * PANEL * 4 + 64) as *const __m512i);
                for i in 0..R {
                    let four = std::ptr::read_unaligned(quants[i].add(4 * q) as *const i32);
                    let xb = _mm512_set1_epi32(four);
                    isum[i][0] = _mm512_dpbusd_epi32(isum[i][0], w0, xb);
                    isum[i][1] = _mm512_dpbusd_epi32(isum[i][1], w1, xb);
                }
            }
            let block = s * STEP / QK;
            let d0 = _mm512_loadu_ps(p.scales.as_ptr().add(s * PANEL));
            let d1 = _mm512_loadu_ps(p.scales.as_ptr().add(s * PANEL + 16));
            for i in 0..R {
                let dx = _mm512_set1_ps(*scales[i].add(block));
                acc[i][0] = _mm512_fmadd_ps(
                    _mm512_mul_ps(d0, dx),
                    _mm512_cvtepi32_ps(isum[i][0]),
                    acc[i][0],
                );
                acc[i][1] = _mm512_fmadd_ps(
                    _mm512_mul_ps(d1, dx),
                    _mm512_cvtepi32_ps(isum[i][1]),
                    acc[i][1],
                );
            }
            if OFFSETS {
                let m0 = _mm512_loadu_ps(p.offsets.as_ptr().add(block * PANEL));
                let m1 = _mm512_loadu_ps(p.offsets.as_ptr().add(block * PANEL + 16));
                for i in 0..R {
                    let sx = _mm512_set1_ps(*sums[i].add(block));
                    acc[i][0] = _mm512_fmadd_ps(m0, sx, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(m1, sx, acc[i][1]);
                }
            }
        }
        for i in 0..R {
            _mm512_storeu_ps(out[i].as_mut_ptr(), acc[i][0]);
            _mm512_storeu_ps(out[i].as_mut_ptr().add(16), acc[i][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn interleaving_puts_four_values_of_each_row_side_by_side() {
        let k = 3 * QK;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let rows: Vec<u8> = (0..k * PANEL).map(|_| rng.random()).collect();
        let mut out = vec![0u8; k * PANEL];
        interleave(&rows, k, &mut out);
        for c in 0..PANEL {
            for v in 0..k {
                let (q, t) = (v / 4, v % 4);
                assert_eq!(
                    out[(q * PANEL + c) * 4 + t],
                    rows[c * k + v],
                    "row {c} value {v}"
                );
            }
        }
    }

    #[test]
    fn only_avx512_vnni_multiplies_through_panels() {
        use super::super::Kernel;
        assert!(supported(Kernel::Avx512Vnni));
        for k in [Kernel::AvxVnni, Kernel::Avx2, Kernel::Portable] {
            assert!(!supported(k));
            // Many rows on a kernel without panels: f32 GEMM, never the AVX-512 code.
            assert_eq!(
                super::super::Path::for_rows(k, 1000),
                super::super::Path::Gemm
            );
        }
    }
}
