//! The CPU backend: f32 activations in `Vec`s, weights in their stored dtype widened to f32 tile
//! by tile inside the GEMM. Work is split across rayon's pool by output columns (GEMM) or rows
//! (everything else); inner loops are written so LLVM vectorises them.

use rayon::prelude::*;

use crate::rope::{RopeTable, rotate_row};
use crate::simd::dot;
use crate::{Backend, HostWeight, Result, WeightData, shape_err};

/// `data: [rows, cols] f32`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// Output columns per GEMM task: enough work per task to amortise widening a tile of weights,
/// few enough tasks to balance across cores.
const GEMM_COLS_PER_TASK: usize = 64;
/// Up to this many rows, `linear` runs as dot products straight off the row-major weights
/// (decode, and the host's MLP share of a decode step: memory-bound, and packing a weight tile
/// for sgemm would triple its traffic).
const GEMV_MAX_ROWS: usize = 32;
/// Below this many elements an elementwise op runs on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(shape_err(
            op,
            format!("{what} has {got} values, expected {want}"),
        ));
    }
    Ok(())
}

fn vector_f32(w: &HostWeight) -> Vec<f32> {
    w.data.to_f32_vec()
}

/// `out[m, c] = x[m, k] · w_tileᵀ` with `w_tile: [c, k]` f32, through matrixmultiply's sgemm.
fn sgemm_tile(x: &[f32], m: usize, k: usize, w_tile: &[f32], c: usize, out: &mut [f32]) {
    // SAFETY: matrixmultiply reads `m*k` values of `x` with strides (k, 1), `k*c` values of
    // `w_tile` with strides (1, k) — i.e. the transpose of a row-major [c, k] tile — and writes
    // `m*c` values of `out` with strides (c, 1). All three slices have exactly those lengths
    // (asserted by the caller's shape checks and the tile split below).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            c,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w_tile.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            c as isize,
            1,
        );
    }
}

/// `out[m, c] = x[m, k] · w[j0 .. j0 + c, :]ᵀ`. Uses the AVX2+FMA register tiles when the CPU
/// has them (checked at run time), else one weight row at a time (widened if needed).
fn gemv_tile(x: &[f32], m: usize, k: usize, w: &WeightData, j0: usize, c: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let f16c = std::arch::is_x86_feature_detected!("f16c");
        // SAFETY: `gemv_tile_avx2` requires AVX2 and FMA, which the CPU was just checked to
        // have, and F16C only when told it is there.
        unsafe { gemv_tile_avx2(x, m, k, w, j0, c, out, f16c) };
        return;
    }
    gemv_tile_portable(x, m, k, w, j0, c, out);
}

/// # Safety
/// The CPU has F16C when `f16c` is true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_tile_avx2(
    x: &[f32],
    m: usize,
    k: usize,
    w: &WeightData,
    j0: usize,
    c: usize,
    out: &mut [f32],
    f16c: bool,
) {
    use half::bf16;
    // Whole tiles of 8 weight rows in registers; the rest row by row.
    let tiled = if k.is_multiple_of(8) { c / 8 * 8 } else { 0 };
    let done = match w {
        // SAFETY (both): AVX2 and FMA are enabled on this function; `w` holds the rows
        // `j0 .. j0 + c` of `k` values (the caller's shape checks), `x` holds `m * k` and `out`
        // `m * c` values, and `k % 8 == 0` whenever `tiled > 0`.
        WeightData::BF16(v) => unsafe { gemv_tiles::<bf16>(x, m, k, v, j0, tiled, c, out) },
        WeightData::F32(v) => unsafe { gemv_tiles::<f32>(x, m, k, v, j0, tiled, c, out) },
        // SAFETY: as above, and the caller says the CPU has F16C.
        WeightData::F16(v) if f16c => unsafe { gemv_tiles_f16c(x, m, k, v, j0, tiled, c, out) },
        // f16 widens in registers only with F16C: row by row here.
        WeightData::F16(_) => 0,
    };
    if done < c {
        let mut rest = vec![0.0f32; m * (c - done)];
        gemv_tile_portable(x, m, k, w, j0 + done, c - done, &mut rest);
        let width = c - done;
        for i in 0..m {
            out[i * c + done..(i + 1) * c].copy_from_slice(&rest[i * width..(i + 1) * width]);
        }
    }
}

/// [`gemv_tiles`] over f16 weights, widened in registers by F16C.
///
/// # Safety
/// As [`gemv_tiles`], and the CPU has F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_tiles_f16c(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[half::f16],
    j0: usize,
    tiled: usize,
    c: usize,
    out: &mut [f32],
) -> usize {
    // SAFETY: the caller's guarantees are `gemv_tiles`' plus F16C, enabled here.
    unsafe { gemv_tiles::<half::f16>(x, m, k, w, j0, tiled, c, out) }
}

/// The first `tiled` (a multiple of 8) output columns of [`gemv_tile`]: for each tile of 8
/// weight rows, the activation rows in groups of up to 6, each group through a register tile
/// sized for it (see [`crate::simd::avx2::gemv_tile`]). The tile's weights come from memory for
/// the first group and from cache for the others. Returns `tiled`, the columns written.
///
/// # Safety
/// The CPU has AVX2 and FMA; `k % 8 == 0` when `tiled > 0`; `w` holds rows `j0 .. j0 + tiled`
/// of `k` values, `x` `m * k` values and `out` `m * c` values with `tiled <= c`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_tiles<E: crate::simd::avx2::Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[E],
    j0: usize,
    tiled: usize,
    c: usize,
    out: &mut [f32],
) -> usize {
    use crate::simd::avx2::gemv_tile;
    assert!(w.len() >= (j0 + tiled) * k && x.len() >= m * k && out.len() >= m * c);
    /// Rows `i .. i + H` against weight rows `jt .. jt + 8`, `T` at a time.
    ///
    /// # Safety
    /// As [`gemv_tiles`], with `i + H <= m` and `jt + 8 <= tiled`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<E: crate::simd::avx2::Widen, const H: usize, const T: usize>(
        x: &[f32],
        k: usize,
        w: &[E],
        j0: usize,
        i: usize,
        jt: usize,
        c: usize,
        out: &mut [f32],
    ) {
        for t0 in (0..8).step_by(T) {
            let rows: [*const E; T] = std::array::from_fn(|t| w[(j0 + jt + t0 + t) * k..].as_ptr());
            // SAFETY: rows i .. i + H of x and T weight rows of k values are in bounds (the
            // caller's assertion and conditions); k % 8 == 0 and AVX2/FMA per the caller.
            let s = unsafe { gemv_tile::<E, H, T>(x[i * k..].as_ptr(), rows, k) };
            for (h, row) in s.iter().enumerate() {
                let o = (i + h) * c + jt + t0;
                out[o..o + T].copy_from_slice(row);
            }
        }
    }
    for jt in (0..tiled).step_by(8) {
        let mut i = 0;
        while i < m {
            let g = (m - i).min(6);
            // SAFETY: i + g <= m and jt + 8 <= tiled, with the caller's guarantees.
            unsafe {
                match g {
                    1 => group::<E, 1, 4>(x, k, w, j0, i, jt, c, out),
                    2 => group::<E, 2, 4>(x, k, w, j0, i, jt, c, out),
                    3 => group::<E, 3, 2>(x, k, w, j0, i, jt, c, out),
                    4 => group::<E, 4, 2>(x, k, w, j0, i, jt, c, out),
                    5 => group::<E, 5, 2>(x, k, w, j0, i, jt, c, out),
                    _ => group::<E, 6, 2>(x, k, w, j0, i, jt, c, out),
                }
            }
            i += g;
        }
    }
    tiled
}

#[inline(always)]
fn gemv_tile_portable(
    x: &[f32],
    m: usize,
    k: usize,
    w: &WeightData,
    j0: usize,
    c: usize,
    out: &mut [f32],
) {
    let mut row = vec![0.0f32; k];
    for j in 0..c {
        let wr: &[f32] = match w {
            WeightData::F32(v) => &v[(j0 + j) * k..(j0 + j + 1) * k],
            _ => {
                w.widen_into((j0 + j) * k, &mut row);
                &row
            }
        };
        for i in 0..m {
            out[i * c + j] = dot(&x[i * k..(i + 1) * k], wr);
        }
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = HostWeight;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload_weight(&self, w: HostWeight) -> Result<HostWeight> {
        Ok(w)
    }

    fn weight_shape(&self, w: &HostWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CpuTensor> {
        check_len("tensor", "data", data.len(), rows * cols)?;
        Ok(CpuTensor { rows, cols, data })
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn embedding(&self, table: &HostWeight, ids: &[u32]) -> Result<CpuTensor> {
        let d = table.cols;
        let mut data = vec![0.0; ids.len() * d];
        for (row, &id) in data.chunks_exact_mut(d).zip(ids) {
            if id as usize >= table.rows {
                return Err(crate::KernelError::TokenOutOfRange {
                    id,
                    vocab: table.rows,
                });
            }
            table.data.widen_into(id as usize * d, row);
        }
        Ok(CpuTensor {
            rows: ids.len(),
            cols: d,
            data,
        })
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &HostWeight,
        bias: Option<&HostWeight>,
    ) -> Result<CpuTensor> {
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if w.cols != k {
            return Err(shape_err(
                "linear",
                format!("x is [{m}, {k}] but w is [{n}, {}]", w.cols),
            ));
        }
        if let Some(b) = bias {
            check_len("linear", "bias", b.data.len(), n)?;
        }
        let tiles: Vec<(usize, Vec<f32>)> = (0..n)
            .step_by(GEMM_COLS_PER_TASK)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|j0| {
                let c = GEMM_COLS_PER_TASK.min(n - j0);
                let mut out = vec![0.0f32; m * c];
                if m <= GEMV_MAX_ROWS {
                    gemv_tile(&x.data, m, k, &w.data, j0, c, &mut out);
                    return (j0, out);
                }
                match &w.data {
                    WeightData::F32(v) => {
                        sgemm_tile(&x.data, m, k, &v[j0 * k..(j0 + c) * k], c, &mut out)
                    }
                    _ => {
                        let mut tile = vec![0.0f32; c * k];
                        w.data.widen_into(j0 * k, &mut tile);
                        sgemm_tile(&x.data, m, k, &tile, c, &mut out);
                    }
                }
                (j0, out)
            })
            .collect();
        let mut data = vec![0.0f32; m * n];
        for (j0, tile) in tiles {
            let c = tile.len() / m.max(1);
            for i in 0..m {
                data[i * n + j0..i * n + j0 + c].copy_from_slice(&tile[i * c..(i + 1) * c]);
            }
        }
        if let Some(b) = bias {
            let b = vector_f32(b);
            for row in data.chunks_exact_mut(n.max(1)) {
                for (o, bb) in row.iter_mut().zip(&b) {
                    *o += bb;
                }
            }
        }
        Ok(CpuTensor {
            rows: m,
            cols: n,
            data,
        })
    }

    fn rms_norm(&self, x: &CpuTensor, w: &HostWeight, eps: f32) -> Result<CpuTensor> {
        check_len("rms_norm", "weight", w.data.len(), x.cols)?;
        let g = vector_f32(w);
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols.max(1)).for_each(|row| {
            let ms = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, gg) in row.iter_mut().zip(&g) {
                *v = *v * inv * gg;
            }
        });
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        w: &HostWeight,
        b: &HostWeight,
        eps: f32,
    ) -> Result<CpuTensor> {
        check_len("layer_norm", "weight", w.data.len(), x.cols)?;
        check_len("layer_norm", "bias", b.data.len(), x.cols)?;
        let (g, bb) = (vector_f32(w), vector_f32(b));
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols.max(1)).for_each(|row| {
            let n = row.len() as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, gg), bv) in row.iter_mut().zip(&g).zip(&bb) {
                *v = (*v - mean) * inv * gg + bv;
            }
        });
        Ok(out)
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()> {
        if x.cols != heads * table.head_dim || positions.len() != x.rows {
            return Err(shape_err(
                "rope",
                format!(
                    "x is [{}, {}], {} positions, {heads} heads of {}",
                    x.rows,
                    x.cols,
                    positions.len(),
                    table.head_dim
                ),
            ));
        }
        x.data
            .par_chunks_mut(x.cols.max(1))
            .zip(positions)
            .for_each(|(row, &pos)| rotate_row(row, pos, table));
        Ok(())
    }

    fn swiglu(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        check_len("swiglu", "up", up.data.len(), gate.data.len())?;
        let mut out = gate.clone();
        let f = |(o, u): (&mut f32, &f32)| {
            let g = *o;
            *o = g / (1.0 + (-g).exp()) * u;
        };
        if out.data.len() >= PARALLEL_MIN_ELEMS {
            out.data.par_iter_mut().zip(&up.data).for_each(f);
        } else {
            out.data.iter_mut().zip(&up.data).for_each(f);
        }
        Ok(out)
    }

    fn relu_inplace(&self, x: &mut CpuTensor) -> Result<()> {
        x.data.iter_mut().for_each(|v| *v = v.max(0.0));
        Ok(())
    }

    fn add_inplace(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        check_len("add", "y", y.data.len(), x.data.len())?;
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn softmax_inplace(&self, x: &mut CpuTensor) -> Result<()> {
        x.data.par_chunks_mut(x.cols.max(1)).for_each(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        });
        Ok(())
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            if r >= x.rows {
                return Err(shape_err("gather_rows", format!("row {r} of {}", x.rows)));
            }
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor {
            rows: rows.len(),
            cols: x.cols,
            data,
        })
    }
}
