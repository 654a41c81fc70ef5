//! The simple baselines `strata bench` runs beside the planner's policy and FlexGen's:
//!
//! - [`layerwise`]: what simple offloading runtimes do. Weights and KV live off the GPU (in host
//!   memory; what does not fit there goes to disk, the KV first), and before each layer runs its
//!   weights and its KV are fetched to the GPU, synchronously: nothing overlaps, so a layer costs
//!   the sum of its streams, not their max ([`serial`]). One batch, no recompute.
//! - [`gpu_only`]: weights and KV all on the GPU, one batch; refused, naming the short tier, when
//!   the workload does not fit the GPU budget.
//!
//! Both give ordinary [`Policy`] values, so the same executor runs them and the same cost model
//! predicts them (for `layerwise`, made serial by [`serial`]).

use crate::cost::{PhaseTime, Prediction, memory};
use crate::error::PlanError;
use crate::flexgen::nothing_fits;
use crate::model::{Budgets, ModelSpec, Workload};
use crate::policy::{Attention, KvPlacement, POLICY_VERSION, PerTier, Policy, Tier, TierSplit};

/// Steps of the host/disk splits [`layerwise`] tries.
const LAYERWISE_STEPS: u32 = 8;

fn base(wl: &Workload, weights: TierSplit, kv: TierSplit, block: u64) -> Policy {
    Policy {
        version: POLICY_VERSION,
        weights,
        kv: KvPlacement {
            hot_window_tokens: 0,
            hot_tier: Tier::Gpu,
            cold: kv,
        },
        recompute: PerTier::default(),
        attention_host: Attention::FetchToGpu,
        attention_disk: Attention::FetchToGpu,
        gpu_batch_size: wl.batch,
        num_gpu_batches: 1,
        kv_block_tokens: block.max(1),
        prefetch_depth: 1,
        host_mlp_share: 0.0,
    }
}

/// The layerwise baseline: weights kept in host memory as far as they fit (in eighths of each
/// layer, the rest on disk), then the KV likewise; everything fetched to the GPU per layer.
pub fn layerwise(
    m: &ModelSpec,
    wl: &Workload,
    budgets: &Budgets,
    block: u64,
) -> Result<Policy, PlanError> {
    let split = |host_eighths: u32| {
        let h = host_eighths as f64 / LAYERWISE_STEPS as f64;
        TierSplit {
            gpu: 0.0,
            host: h,
            disk: 1.0 - h,
        }
    };
    let mut closest = None;
    let mut considered = 0;
    for w in (0..=LAYERWISE_STEPS).rev() {
        for k in (0..=LAYERWISE_STEPS).rev() {
            considered += 1;
            let p = base(wl, split(w), split(k), block);
            let mem = memory(m, wl, &p);
            if budgets.hold(&mem) {
                return Ok(p);
            }
            closest.get_or_insert(mem);
        }
    }
    Err(nothing_fits(
        &closest.unwrap_or_default(),
        budgets,
        considered,
    ))
}

/// The GPU-only baseline, or which tier is short.
pub fn gpu_only(
    m: &ModelSpec,
    wl: &Workload,
    budgets: &Budgets,
    block: u64,
) -> Result<Policy, PlanError> {
    let all = TierSplit::all_on(Tier::Gpu);
    let p = base(wl, all, all, block);
    let mem = memory(m, wl, &p);
    if mem.gpu <= budgets.gpu_bytes {
        Ok(p)
    } else {
        Err(nothing_fits(&mem, budgets, 1))
    }
}

/// A prediction with nothing overlapped: each layer costs the sum of its streams, and there is
/// no pipeline to fill (what a synchronous, layer-by-layer runtime does).
pub fn serial(pred: &Prediction, m: &ModelSpec, wl: &Workload) -> Prediction {
    let phase = |p: &PhaseTime| {
        let layer_s = p.per_layer.sum();
        PhaseTime {
            per_layer: p.per_layer,
            bound_by: p.per_layer.max().0,
            layer_s,
            pipeline_fill_s: 0.0,
            head_s: p.head_s,
            total_s: m.layers as f64 * layer_s + p.head_s,
            floor_s: p.floor_s,
        }
    };
    let decode_step = phase(&pred.decode_step);
    let prefill = phase(&pred.prefill);
    let n = wl.gen_len as f64;
    let total_s = prefill.total_s + n * decode_step.total_s;
    Prediction {
        decode_step,
        prefill,
        bound_by: decode_step.bound_by,
        decode_tokens_per_s: wl.batch as f64 / decode_step.total_s,
        tokens_per_s: if total_s > 0.0 {
            wl.batch as f64 * n / total_s
        } else {
            0.0
        },
        total_s,
        memory: pred.memory,
    }
}
