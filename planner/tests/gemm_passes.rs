//! `--gpu-gemm split` runs every GEMM of more than `GEMV_MAX_ROWS` rows over half-precision
//! weights twice: the cost model charges the second pass there, and nowhere else.

#![allow(clippy::unwrap_used)]

mod common;

use common::{llama_3_8b, streamed_policy, wl};

use strata_planner::{GEMV_MAX_ROWS, HardwareProfile, Policy, Tier, TierSplit, predict};

/// Weights and KV all on the GPU, one GPU batch of `batch` sequences.
fn resident(batch: u64) -> Policy {
    let mut p = streamed_policy(batch, TierSplit::all_on(Tier::Gpu));
    p.weights = TierSplit::all_on(Tier::Gpu);
    p
}

#[test]
fn split_gemms_cost_twice_above_the_gemv_rows_only() {
    let hw = HardwareProfile::h100_reference();
    let (one, two) = (llama_3_8b(), llama_3_8b().with_gemm_passes(2));

    // 16 rows a GPU batch: the prefill's GEMMs (the bulk of its time) and the decode step's
    // weight reads (the bulk of its time at 2K context) both run twice.
    let (w, p) = (wl(16, 2048), resident(16));
    let (a, b) = (predict(&one, &w, &p, &hw), predict(&two, &w, &p, &hw));
    let prefill = b.prefill.total_s / a.prefill.total_s;
    assert!((1.5..2.0).contains(&prefill), "prefill {prefill:.3}×");
    let decode = b.decode_step.total_s / a.decode_step.total_s;
    assert!((1.4..2.0).contains(&decode), "decode step {decode:.3}×");

    // GEMV_MAX_ROWS rows a GPU batch: decode runs the GEMV kernel once either way; the prompt's
    // GEMMs (8 × 2048 rows) still run twice.
    let (w, p) = (wl(GEMV_MAX_ROWS, 2048), resident(GEMV_MAX_ROWS));
    let (a, b) = (predict(&one, &w, &p, &hw), predict(&two, &w, &p, &hw));
    assert_eq!(a.decode_step.total_s, b.decode_step.total_s);
    assert!(b.prefill.total_s > 1.5 * a.prefill.total_s);

    // f32 weights have no half-precision terms to split.
    let mut f32_one = llama_3_8b();
    f32_one.weight_dtype_bytes = 4;
    let f32_two = f32_one.clone().with_gemm_passes(2);
    let (w, p) = (wl(16, 2048), resident(16));
    let (a, b) = (
        predict(&f32_one, &w, &p, &hw),
        predict(&f32_two, &w, &p, &hw),
    );
    assert_eq!(a.total_s, b.total_s);
}
