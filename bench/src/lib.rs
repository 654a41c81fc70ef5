//! strata's component benchmarks, as binaries (`strata bench` compares whole policies):
//! - `tier-attention`: host and storage attention throughput against memcpy and disk-read
//!   bandwidth measured in the same run;
//! - `cpu-gemv`: the host MLP share's matrix-vector products against memcpy;
//! - `gpu-attention`, `gpu-prefill`, `gpu-gemm`: the GPU kernels against copy bandwidth and
//!   PyTorch.
//!
//! CPU decode figures come from `bench/cpu-decode.sh` (`strata generate --stats-json`). Results
//! are recorded in `RESULTS.md`.

use std::time::Instant;

/// The shortest of `reps` (at least 1) timed calls of `f`, in seconds, with the last call's
/// result.
pub fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut out = None;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let r = f();
        best = best.min(t0.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.expect("at least one repetition"))
}
