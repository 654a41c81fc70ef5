//! The search's filling of faster tiers ([`fill_faster_tiers`]), on Llama-3-8B shapes and the
//! H100 reference profile.

#![allow(clippy::unwrap_used)]

mod common;

use common::{GIB, llama_3_8b, streamed_policy, wl};

use strata_planner::fill::fill_faster_tiers;
use strata_planner::{Budgets, HardwareProfile, Policy, Tier, TierSplit, memory, plan, predict};

/// 18 GiB of GPU memory holds the weights, the workspace and some KV; 2 GiB of host memory
/// holds most of the rest. The grid's quarter steps put no cold KV on the GPU, but the plan
/// moves cold KV into the room the GPU budget leaves, up to the last whole block, and predicts
/// faster for it.
#[test]
fn leftover_gpu_memory_holds_kv() {
    let m = llama_3_8b();
    let w = wl(4, 4096);
    let budgets = Budgets {
        gpu_bytes: 18 * GIB,
        host_bytes: 2 * GIB,
        disk_bytes: 40 * GIB,
    };
    let hw = HardwareProfile::h100_reference();
    let chosen = plan(&m, &w, &budgets, &hw).unwrap();
    let p = chosen.policy;
    let quarters = (p.kv.cold.gpu * 4.0).fract();
    assert!(p.kv.cold.gpu > 0.0 && quarters > 1e-6, "{p:?}");
    let mem = memory(&m, &w, &p);
    let one_block = w.batch * m.layers * m.kv_bytes_per_token_per_layer() * p.kv_block_tokens;
    assert!(mem.gpu <= budgets.gpu_bytes, "{mem:?}");
    assert!(
        budgets.gpu_bytes - mem.gpu < one_block,
        "{mem:?} leaves a block unused"
    );
    // Filling again moves nothing onto the GPU.
    let again = fill_faster_tiers(&m, &w, &p, &budgets, &mem);
    assert!(
        again.is_none_or(|q| q.kv.cold.gpu == p.kv.cold.gpu),
        "{again:?}"
    );
}

/// Filling takes the slowest tier's KV first, keeps the split whole and fits the budgets.
#[test]
fn filling_moves_disk_kv_up_first_and_stays_within_budgets() {
    let m = llama_3_8b();
    let w = wl(4, 4096);
    let p = Policy {
        weights: TierSplit::all_on(Tier::Gpu),
        ..streamed_policy(
            4,
            TierSplit {
                gpu: 0.0,
                host: 0.5,
                disk: 0.5,
            },
        )
    };
    let used = memory(&m, &w, &p);
    let budgets = Budgets {
        gpu_bytes: used.gpu + GIB / 2,
        host_bytes: used.host,
        disk_bytes: used.disk,
    };
    let filled = fill_faster_tiers(&m, &w, &p, &budgets, &used).unwrap();
    let c = filled.kv.cold;
    assert!(c.gpu > 0.0 && c.host == 0.5 && c.disk < 0.5, "{c:?}");
    assert!((c.gpu + c.host + c.disk - 1.0).abs() < 1e-9);
    let mem = memory(&m, &w, &filled);
    assert!(mem.gpu <= budgets.gpu_bytes && mem.host <= budgets.host_bytes);
    let hw = HardwareProfile::h100_reference();
    assert!(predict(&m, &w, &filled, &hw).total_s < predict(&m, &w, &p, &hw).total_s);
}
