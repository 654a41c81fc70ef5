//! Which cold blocks are attended away from where they live, and what a cold block stores
//! (policy: pure functions of a block's index; the tier manager applies them).
//!
//! - **Routes** ([`AttentionRoutes`]): of a sequence's KV blocks in one layer and one tier (host
//!   or disk), in position order, the first `round(n · near)` are attended near the data (host
//!   threads; the storage engine) and the rest are **fetched** to the compute device and attended
//!   there (`Attention::FetchToGpu` is `near = 0`, `AttendNear` is `near = 1`, `Split` between).
//! - **Recompute** ([`stores_hidden`]): a share `r` of full blocks keep the layer's input hidden
//!   states `[block_tokens, d_model] f32` instead of K and V (in the tier's dtype); block `j` is chosen when
//!   `floor((j + 1)·r) > floor(j·r)`, so any prefix of `n` blocks holds `floor(n·r)` of them. Their
//!   K and V are regenerated on the compute device when attention needs them. The writable
//!   (last) block always holds K and V.
//!
//! Either way the partials merge by LSE with the rest, so the tokens do not change.

use strata_kernels::{DType, KvBuf};

use super::SeqId;

/// Fractions of the host and disk tiers' KV attended near the data; the rest is fetched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionRoutes {
    pub host_near: f64,
    pub disk_near: f64,
}

impl Default for AttentionRoutes {
    /// Everything attended where it lives.
    fn default() -> Self {
        Self {
            host_near: 1.0,
            disk_near: 1.0,
        }
    }
}

/// How many of `n` blocks are attended near the data at fraction `near`.
pub fn near_count(n: usize, near: f64) -> usize {
    ((n as f64 * near.clamp(0.0, 1.0)).round() as usize).min(n)
}

/// Whether full block `j` stores hidden states at recompute share `r`.
pub fn stores_hidden(j: usize, r: f64) -> bool {
    let r = r.clamp(0.0, 1.0);
    ((j + 1) as f64 * r).floor() > (j as f64 * r).floor()
}

/// A cold block gathered for the compute device: positions `start_pos .. start_pos + len` of
/// `seq`. `data` is K then V, each `[kv_heads, block_tokens, head_dim]`, in the dtype the tier
/// stored them (`kv_dtype`: no widening on the way to the device); while `hidden`, it is the
/// layer's input hidden states `[len, d_model] f32` instead, to be turned into K and V (see
/// `Transformer`'s recompute, which rounds them to `kv_dtype` as an append would) before
/// attention. A host block bound for the GPU's scratch stays where it is (`in_host`, `data`
/// empty): the GPU copies it straight from the page-locked arena.
#[derive(Clone, Debug)]
pub struct FarBlock {
    pub seq: SeqId,
    pub in_host: Option<strata_storage::SlotId>,
    pub start_pos: usize,
    pub len: usize,
    pub hidden: bool,
    /// The host and disk tiers' K and V dtype.
    pub kv_dtype: DType,
    pub data: KvBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_recompute_shares_pick_the_expected_blocks() {
        assert_eq!(near_count(10, 1.0), 10);
        assert_eq!(near_count(10, 0.0), 0);
        assert_eq!(near_count(10, 0.34), 3);
        let picked = |r: f64| (0..8).filter(|&j| stores_hidden(j, r)).count();
        assert_eq!((picked(0.0), picked(0.5), picked(1.0)), (0, 4, 8));
        let half: Vec<bool> = (0..4).map(|j| stores_hidden(j, 0.5)).collect();
        assert_eq!(half, vec![false, true, false, true]);
    }
}
