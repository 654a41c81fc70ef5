//! What the kernel tests and benchmarks share: a seeded random stream, the run's seed (fresh per
//! run, printed, replayable with `STRATA_TEST_SEED`), a NaN-aware relative-error measure, and the
//! shared GPU backend (or the reason there is none, printed as `skipped: ...`); and the synthetic
//! KV blocks that host attention is benchmarked on.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::kv::KvBuf;
use crate::{
    AttentionGeometry, CudaBackend, CudaUnavailable, DType, HostWeight, KvBlockView, RopeScaling,
    WeightData,
};

/// SplitMix64: a tiny seeded random stream.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }

    /// Uniform in `[-scale, scale)`.
    pub fn vec_scaled(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }

    /// A `rows × cols` weight of uniform values, rounded to `dtype`.
    pub fn weight(&mut self, rows: usize, cols: usize, dtype: DType) -> HostWeight {
        let data = WeightData::F32(self.vec(rows * cols)).cast(dtype);
        HostWeight { rows, cols, data }
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
    }
}

/// The RoPE variants every RoPE test covers: none, linear, and Llama-3 scaling with a short
/// original context so the scaling changes frequencies at small head dims.
pub fn rope_scalings() -> [RopeScaling; 3] {
    [
        RopeScaling::None,
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        },
    ]
}

/// This run's seed: `STRATA_TEST_SEED` when set, else the clock. Printed, so a failure replays.
pub fn test_seed() -> u64 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7);
    let s = std::env::var("STRATA_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(clock);
    eprintln!("STRATA_TEST_SEED={s}");
    s
}

/// `max |got - want| / max |want|`; a NaN in `got` (a poisoned element left unwritten) counts
/// as an infinite error.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(1e-6f32, |a, &b| a.max(b.abs()));
    got.iter().zip(want).fold(0.0f32, |a, (g, w)| {
        let e = (g - w).abs() / scale;
        if e.is_nan() { f32::INFINITY } else { a.max(e) }
    })
}

/// Whether `a` and `b` hold the same values bit for bit (NaNs included), and as many.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// One GPU backend shared by every test of a binary, with output poisoning on; `None` (after
/// printing `skipped: <reason>`) on a machine without a usable GPU.
pub fn test_gpu() -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Result<CudaBackend, CudaUnavailable>> = OnceLock::new();
    match GPU.get_or_init(|| {
        CudaBackend::new(0).inspect(|b| {
            b.poison_outputs(true);
            eprintln!("gpu: {} — kernels {}", b.device_info(), b.kernel_origin());
        })
    }) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// `blocks` KV blocks of `block_elems` K then `block_elems` V values each (`[K, V][kv_heads,
/// block_tokens, head_dim]`), deterministic values in `[-1, 1)` stored in `dtype`: the data of
/// the host attention benchmark and of `strata calibrate`'s host attention measurement.
pub fn synthetic_kv_blocks(dtype: DType, blocks: usize, block_elems: usize) -> Vec<KvBuf> {
    (0..blocks)
        .into_par_iter()
        .map(|b| {
            let wide: Vec<f32> = (0..2 * block_elems)
                .map(|i| (((b * 31 + i * 7) % 1000) as f32 / 500.0) - 1.0)
                .collect();
            KvBuf::from_f32(dtype, &wide)
        })
        .collect()
}

/// Views of full blocks laid end to end from position 0 (as [`synthetic_kv_blocks`] makes them).
pub fn full_block_views<'a>(kv: &'a [KvBuf], g: &AttentionGeometry) -> Vec<KvBlockView<'a>> {
    let e = g.block_elems();
    kv.iter()
        .enumerate()
        .map(|(b, d)| KvBlockView {
            k: d.as_slice().slice(0..e),
            v: d.as_slice().slice(e..2 * e),
            start_pos: b * g.block_tokens,
            len: g.block_tokens,
        })
        .collect()
}

/// A fixed decode query `[n_heads, head_dim]` for benchmarks.
pub fn bench_query(g: &AttentionGeometry) -> Vec<f32> {
    (0..g.n_heads * g.head_dim)
        .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
        .collect()
}
