//! 8-bit blocks ([`Q8Matrix`]: GGUF's `Q8_0`, and every type `native` requantizes) kept as the
//! 8-bit panels' own layout ([`panels`]): per panel of [`PANEL`] rows the values as unsigned
//! bytes `q + 128` interleaved four at a time and an `f32` scale per block and column, the
//! same bytes as the blocks. The panel kernel then serves every row count without packing
//! (in a `Q4_K_M` 0.5B file the `Q8_0` embedding is also the output head, 136M of its 494M
//! weights; in SmolLM2-135M's `Q4_1` file it is 28M of 135M).

use super::PANEL;
use crate::model::quant::arena::WeightArena;
use crate::model::quant::panels::{self, PanelActivations, PanelFormat};
use crate::model::quant::{BlockWeights, Q8Matrix, QK};
use rayon::prelude::*;

/// A `[rows, cols]` matrix of 8-bit blocks in panels; `rows` a multiple of [`PANEL`], `cols`
/// of [`QK`].
#[derive(Clone)]
pub struct Q8Panels {
    rows: usize,
    cols: usize,
    /// The blocks' panel format (`q + 128`, zero point 128, a scale per block).
    format: PanelFormat,
    panels: Vec<panels::Panel>,
}

impl std::fmt::Debug for Q8Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Panels[{}, {}]", self.rows, self.cols)
    }
}

impl Q8Panels {
    /// `q` in panels, when its rows fill whole panels and its columns whole blocks; else
    /// `None` (it stays as it is).
    pub fn from_q8(q: &Q8Matrix) -> Option<Q8Panels> {
        let (rows, cols) = (q.rows(), q.cols());
        if rows == 0 || !rows.is_multiple_of(PANEL) || cols == 0 || !cols.is_multiple_of(QK) {
            return None;
        }
        let panels = (0..rows / PANEL)
            .into_par_iter()
            .map_init(panels::Unpacked::default, |scratch, p| {
                let mut panel = panels::Panel::default();
                panel.pack(q, p * PANEL..(p + 1) * PANEL, cols / QK, scratch);
                panel
            })
            .collect();
        Some(Q8Panels {
            rows,
            cols,
            format: BlockWeights::panel_format(q),
            panels,
        })
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
        self.panels.iter_mut().for_each(|p| p.place_in(arena));
    }

    /// Whether every panel's buffers are in an arena ([`Q8Panels::place_in`] done).
    pub fn placed(&self) -> bool {
        self.panels.iter().all(panels::Panel::placed)
    }

    /// Bytes the matrix holds in memory (the same as the [`Q8Matrix`] it came from).
    pub fn bytes(&self) -> usize {
        self.panels.iter().map(panels::Panel::bytes).sum()
    }

    /// Row `r` as `f32` (`out.len() == cols`): `d·(u − 128)`, as the blocks give it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (panel, c) = (&self.panels[r / PANEL], r % PANEL);
        for (v, o) in out.iter_mut().enumerate() {
            let (u, d) = panel.value(c, v);
            *o = d * (u as i32 - self.format.zero) as f32;
        }
    }

    /// `x · selfᵀ` for `x` row-major `[m, cols]`: `[m, rows]`, row-major: the activations
    /// quantized to 8-bit blocks, the panels split between rayon's threads (about four runs
    /// each), each run taking the activation rows in chunks that stay in cache, a tile of rows
    /// per kernel call. Only on AVX-512 VNNI ([`super::simd`]); elsewhere the blocks are
    /// never laid out in panels, and a matrix built anyway (a test) multiplies as dequantized
    /// rows.
    ///
    /// # Panics
    /// When `x.len() != m * cols` (a caller's bug).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "Q8Panels::matmul_t: shape");
        let mut y = vec![0f32; m * n];
        if m == 0 {
            return y;
        }
        let xq = crate::model::quant::Activations::quantize(x, m, k, false, 1);
        if super::simd() != super::Simd::Vnni {
            // The blocks' values against the quantized activations, in f64 (tests only).
            let xd = xq.q.dequantize();
            let mut row = vec![0f32; k];
            for j in 0..n {
                self.dequantize_row(j, &mut row);
                for i in 0..m {
                    let dot: f64 = (0..k).map(|c| xd[i * k + c] as f64 * row[c] as f64).sum();
                    y[i * n + j] = dot as f32;
                }
            }
            return y;
        }
        let xs = PanelActivations::new(&xq, self.format);
        super::for_each_tile(
            &mut y,
            m,
            k,
            usize::MAX,
            |_| {},
            |_, p, rows, tile| {
                // SAFETY: AVX-512 VNNI (`enabled`, checked above); the panel holds `k` values a
                // row, as the activations do.
                unsafe { self.panels[p].multiply(&xs, rows, tile) }
            },
        );
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn panels_hold_the_blocks_values_and_multiply_like_them() {
        let (n, k) = (64, 96);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let q = Q8Matrix::quantize(&w, n, k);
        let p = Q8Panels::from_q8(&q).expect("whole panels");
        assert_eq!(p.bytes(), q.bytes());
        let values = q.dequantize();
        let mut row = vec![0f32; k];
        for r in 0..n {
            p.dequantize_row(r, &mut row);
            assert_eq!(row, values[r * k..(r + 1) * k].to_vec(), "row {r}");
        }
        assert!(Q8Panels::from_q8(&Q8Matrix::quantize(&w[..48 * k], 48, k)).is_none());
        for m in [1usize, 3, 4, 9] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let xq = Q8Matrix::quantize(&x, m, k).dequantize();
            let got = p.matmul_t(&x, m);
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|c| xq[i * k + c] as f64 * values[j * k + c] as f64);
                    let want: f64 = terms.clone().sum();
                    let tol = 1e-5 * terms.map(f64::abs).sum::<f64>().max(1e-3);
                    let v = got[i * n + j] as f64;
                    assert!((v - want).abs() <= tol, "m={m} [{i},{j}]: {v} vs {want}");
                }
            }
        }
    }
}
