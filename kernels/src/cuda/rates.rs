//! What a decode step's two big readers reach on this GPU, for the planner's calibration: the
//! weights read by `linear` at a decode batch's rows, and the KV read by the split-KV decode
//! kernel at a batch of sequences. Both read HBM, but neither at the device copy's rate: on an
//! H100 the GEMV (1–8 rows) streamed weights at ~89% of it and cuBLAS at 16–64 rows at ~75%;
//! the decode kernel read 16 sequences of 2K tokens at ~77% and 32 at ~92%.

use super::{CudaBackend, KvBlockShape};
use crate::attention::AttentionGeometry;
use crate::{Backend, DType, HostWeight, Result, WeightData};

/// Llama-3-8B's attention heads: the decode kernel's common case (GQA, group of 4).
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;

impl CudaBackend {
    /// GB/s of weights `linear` streams at each of `rows` rows: one Llama-3-8B layer's seven
    /// bf16 projections (q, k, v and o on a `[rows, 4096]` input, gate and up on another, down
    /// on a `[rows, 14336]` one; 436 MB, far past L2) applied `reps` times in a row, timed
    /// together, best of `trials`. The rate includes each call's own launches, as a decode
    /// step pays them; the activation's conversion for the GEMMs of more than 8 rows is made
    /// once per input tensor and kept (the operand cache), so fewer of them are timed than the
    /// four a decode layer makes. The GEMMs run in the backend's current
    /// [`super::GemmPrecision`].
    pub fn decode_linear_gbps(
        &self,
        rows: &[usize],
        reps: usize,
        trials: usize,
    ) -> Result<Vec<f64>> {
        const HIDDEN: usize = 4096;
        const KV: usize = 1024;
        const FFN: usize = 14336;
        let seed = super::calibrate::pseudo_random(1 << 20);
        let weight = |r: usize, c: usize| -> Result<_> {
            let w = HostWeight {
                rows: r,
                cols: c,
                data: WeightData::F32(cycled(&seed, r * c)).cast(DType::BF16),
            };
            self.upload_weight(w)
        };
        // (weight, whether it reads the FFN-wide input).
        let shapes = [
            (HIDDEN, HIDDEN, false),
            (KV, HIDDEN, false),
            (KV, HIDDEN, false),
            (HIDDEN, HIDDEN, false),
            (FFN, HIDDEN, false),
            (FFN, HIDDEN, false),
            (HIDDEN, FFN, true),
        ];
        let ws = shapes
            .iter()
            .map(|&(r, c, _)| weight(r, c))
            .collect::<Result<Vec<_>>>()?;
        let bytes: usize = shapes.iter().map(|&(r, c, _)| 2 * r * c).sum();
        let mut out = Vec::with_capacity(rows.len());
        for &m in rows {
            let x_in = self.upload(m, HIDDEN, &cycled(&seed, m * HIDDEN))?;
            let x_ffn = self.upload(m, FFN, &cycled(&seed, m * FFN))?;
            let round = || -> Result<()> {
                for _ in 0..reps.max(1) {
                    for (w, &(_, _, wide)) in ws.iter().zip(&shapes) {
                        drop(self.linear(if wide { &x_ffn } else { &x_in }, w, None)?);
                    }
                }
                Ok(())
            };
            let best = self.best_ms(trials, round)?;
            out.push((bytes * reps.max(1)) as f64 / (best * 1e-3) / 1e9);
        }
        Ok(out)
    }

    /// The split-KV decode kernel over `batches` sequences of `context` tokens each in
    /// `block_tokens`-token blocks of bf16 KV (Llama-3-8B's heads, one query per sequence):
    /// per batch, the KV bytes read and the seconds per launch (`reps` launches in a row, timed
    /// together, best of `trials`), each launch paying its own split and merge as a decode
    /// layer does.
    pub fn decode_attention_times(
        &self,
        batches: &[usize],
        context: usize,
        block_tokens: usize,
        reps: usize,
        trials: usize,
    ) -> Result<Vec<(f64, f64)>> {
        let shape = KvBlockShape {
            kv_heads: KV_HEADS,
            block_tokens,
            head_dim: HEAD_DIM,
        };
        let per_seq = context.div_ceil(block_tokens).max(1);
        let most = batches.iter().copied().max().unwrap_or(1).max(1);
        let mut pool = self.kv_pool(DType::BF16, shape, most * per_seq)?;
        let seed_blocks = (most * per_seq).min(64);
        let values = super::calibrate::pseudo_random(seed_blocks * shape.block_elems());
        self.kv_pool_write(&mut pool, 0, &values)?;
        self.kv_pool_tile(&mut pool, seed_blocks)?;
        let g = AttentionGeometry::new(HEADS, KV_HEADS, HEAD_DIM, block_tokens);
        let token_bytes = 2 * KV_HEADS * HEAD_DIM * 2;
        let reps = reps.max(1);
        let mut out = Vec::with_capacity(batches.len());
        for &b in batches {
            let b = b.max(1);
            let tables: Vec<Vec<u32>> = (0..b)
                .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
                .collect();
            let t = self.upload_block_tables(&tables, &vec![context; b], block_tokens)?;
            let q = self.upload(b, HEADS * HEAD_DIM, &cycled(&values, b * HEADS * HEAD_DIM))?;
            let round = || -> Result<()> {
                for _ in 0..reps {
                    drop(self.decode_attention(&q, &pool, &t, &g)?);
                }
                Ok(())
            };
            let best = self.best_ms(trials, round)?;
            out.push((
                (b * context * token_bytes) as f64,
                best * 1e-3 / reps as f64,
            ));
        }
        Ok(out)
    }

    /// Milliseconds of `round` on the device, the best of `trials` timings after one untimed
    /// call (first calls make heuristics, descriptors and scratch).
    fn best_ms(&self, trials: usize, round: impl Fn() -> Result<()>) -> Result<f64> {
        round()?;
        let mut best = f64::INFINITY;
        for _ in 0..trials.max(1) {
            best = best.min(self.time_ms(&round)?.0);
        }
        Ok(best)
    }
}

/// `n` values repeating `seed`.
fn cycled(seed: &[f32], n: usize) -> Vec<f32> {
    seed.iter().copied().cycle().take(n).collect()
}
