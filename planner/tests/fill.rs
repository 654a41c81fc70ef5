//! The search's filling of faster tiers ([`fill_faster_tiers`]), on Llama-3-8B shapes and the
//! H100 reference profile.

#![allow(clippy::unwrap_used)]

mod common;

use common::{GIB, llama_3_8b, streamed_policy, wl};

use strata_planner::fill::fill_faster_tiers;
use strata_planner::{
    Budgets, HardwareProfile, Policy, Tier, TierSplit, gpu_kv_min_blocks, gpu_scratch_blocks,
    memory, plan, predict, prefill_batch_rows,
};

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

/// GPU memory as the runtime lays it out: KV kept off the GPU needs the scratch blocks (twice a
/// prefill GPU batch's blocks) on the GPU, and any KV on the GPU needs at least the tier's
/// minimum (a writable block per sequence and layer, a prefill GPU batch's blocks, one per
/// sequence), so a sliver of cold KV moved onto the GPU costs that minimum, and filling takes
/// none when the room is smaller.
#[test]
fn gpu_kv_costs_at_least_the_runtime_tier_and_host_kv_the_scratch() {
    let m = llama_3_8b();
    let w = wl(4, 4096);
    let split = |gpu: f64| TierSplit {
        gpu,
        host: 1.0 - gpu,
        disk: 0.0,
    };
    let mut all_gpu = streamed_policy(4, split(1.0));
    all_gpu.weights = TierSplit::all_on(Tier::Gpu);
    let on = |p: &Policy, tier: Tier| memory(&m, &w, p).get(tier) as f64;
    let bt = all_gpu.kv_block_tokens;
    let block = (bt * m.kv_bytes_per_token_per_layer()) as f64;
    let rows = prefill_batch_rows(&all_gpu, &w);
    let scratch = gpu_scratch_blocks(rows, bt) as f64 * block;
    // Half the cold KV to host memory: the GPU gives up what the host takes, less the scratch.
    let half = Policy {
        kv: strata_planner::KvPlacement {
            cold: split(0.5),
            ..all_gpu.kv
        },
        ..all_gpu
    };
    let moved = on(&half, Tier::Host) - on(&all_gpu, Tier::Host);
    let freed = on(&all_gpu, Tier::Gpu) - on(&half, Tier::Gpu);
    assert!(moved > 0.0);
    let rounding = (w.batch * m.layers) as f64 * block;
    assert!(
        (freed - (moved - scratch)).abs() <= rounding,
        "freed {freed}, moved {moved}, scratch {scratch}"
    );
    // All KV in host memory, then a sliver of it on the GPU: the sliver costs the minimum tier.
    let mut host = half;
    host.kv.hot_tier = Tier::Host;
    host.kv.cold = split(0.0);
    let mut sliver = host;
    sliver.kv.cold = split(0.001);
    let min = gpu_kv_min_blocks(w.batch, m.layers, rows, bt) as f64 * block;
    let cost = on(&sliver, Tier::Gpu) - on(&host, Tier::Gpu);
    assert!(
        (cost - min).abs() < 1.0,
        "a sliver costs {cost}, the minimum tier is {min}"
    );
    // Room for less than the minimum: filling moves nothing onto the GPU.
    let used = memory(&m, &w, &host);
    let budgets = Budgets {
        gpu_bytes: used.gpu + (min / 2.0) as u64,
        host_bytes: 64 * GIB,
        disk_bytes: 0,
    };
    let filled = fill_faster_tiers(&m, &w, &host, &budgets, &used);
    assert!(filled.is_none_or(|p| p.kv.cold.gpu == 0.0), "{filled:?}");
    // Room for twice the minimum: a tier that fits.
    let budgets = Budgets {
        gpu_bytes: used.gpu + (2.0 * min) as u64,
        ..budgets
    };
    let filled = fill_faster_tiers(&m, &w, &host, &budgets, &used).unwrap();
    assert!(filled.kv.cold.gpu > 0.0);
    assert!(memory(&m, &w, &filled).gpu <= budgets.gpu_bytes);
}
