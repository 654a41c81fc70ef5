//! Filling the faster tiers. The search's grid splits cold KV in coarse shares (quarters), so a
//! policy can leave part of a tier's budget unused while a slower tier holds KV that would fit
//! there: GPU memory left over after the weights and the workspace, or host memory a quarter
//! step short of the next share. [`fill_faster_tiers`] moves cold tokens up into that room, in
//! whole blocks of every sequence in every layer: onto the GPU from disk, then from host memory;
//! then into host memory from disk. The runtime sizes its GPU KV tier from the policy, so the KV
//! the plan counts on the GPU is the KV that lands there.
//!
//! Invariants: the filled policy's splits still sum to 1; a GPU that holds no KV receives some
//! only when its room holds the runtime's smallest GPU KV tier ([`crate::gpu_kv_min_blocks`]);
//! no tier receives tokens whose storage it would change (a target tier with a recompute share
//! is left as it is, since moved tokens would turn into hidden states there); host memory is
//! filled only where it already holds KV (its attention route was chosen for it); a tier left
//! with no cold tokens keeps no recompute share. The caller checks the result against the
//! budgets.

use crate::cost::TierBytes;
use crate::model::{Budgets, ModelSpec, Workload};
use crate::policy::{Policy, Tier};

/// `p` with cold tokens moved up into the room `used` (its memory, [`crate::memory`]) leaves
/// in `budgets`; `None` when nothing moves.
pub fn fill_faster_tiers(
    m: &ModelSpec,
    wl: &Workload,
    p: &Policy,
    budgets: &Budgets,
    used: &TierBytes,
) -> Option<Policy> {
    let final_len = wl.final_len();
    let cold_tokens = final_len - p.kv.hot_window_tokens.min(final_len);
    if cold_tokens == 0 {
        return None;
    }
    // One token of every sequence in every layer, as KV.
    let token_bytes = wl.batch * m.layers * m.kv_bytes_per_token_per_layer();
    let block_bytes = token_bytes * p.kv_block_tokens;
    let room_share =
        |free: u64| (free / block_bytes * p.kv_block_tokens) as f64 / cold_tokens as f64;
    let mut filled = *p;
    let mut moved = false;
    let targets = [
        (
            Tier::Gpu,
            budgets.gpu_bytes.saturating_sub(used.gpu),
            &[Tier::Disk, Tier::Host][..],
        ),
        (
            Tier::Host,
            budgets.host_bytes.saturating_sub(used.host),
            &[Tier::Disk][..],
        ),
    ];
    // The runtime keeps a GPU KV tier of at least its minimum, or none.
    let min_tier = crate::cost::gpu_kv_min_bytes(m, wl, p);
    for (target, free, sources) in targets {
        if !can_receive(&filled, target)
            || (target == Tier::Gpu && !p.keeps_gpu_kv() && free < min_tier)
        {
            continue;
        }
        let mut room = room_share(free);
        for &source in sources {
            let take = room.min(filled.kv.cold.get(source));
            if take > 0.0 {
                shift_cold(&mut filled, source, target, take);
                room -= take;
                moved = true;
            }
        }
    }
    // A tier emptied of cold tokens stores none: no recompute share is left behind there.
    for tier in [Tier::Host, Tier::Disk] {
        if moved && filled.kv.cold.get(tier) <= 1e-12 {
            *filled.kv.cold.get_mut(tier) = 0.0;
            *filled.recompute.get_mut(tier) = 0.0;
        }
    }
    moved.then_some(filled)
}

/// Whether moved tokens can land on `target` as KV attended the way the policy already chose.
fn can_receive(p: &Policy, target: Tier) -> bool {
    let holds_kv = p.kv.cold.get(target) > 0.0 || p.kv.hot_tier == target;
    p.recompute.get(target) == 0.0 && (target == Tier::Gpu || holds_kv)
}

fn shift_cold(p: &mut Policy, from: Tier, to: Tier, share: f64) {
    *p.kv.cold.get_mut(from) -= share;
    *p.kv.cold.get_mut(to) += share;
}
