//! The compute device's side of far blocks ([`crate::kv::far`]): K and V regenerated from stored
//! hidden states, and attention over fetched blocks on a backend that attends on the host.
//! On a GPU with scratch blocks, hidden states in host memory are copied straight into scratch
//! and regenerated there ([`crate::kv::KvCache::attend_device`]); the rest come here.
//!
//! Recompute repeats exactly what the layer did when the token first went through: the layer's
//! input norm, the K and V projections (with their biases), and RoPE at the token's original
//! position, on the backend that computes (weights already there). The result is laid out as a
//! KV block, so from then on it is attended like a fetched block and merged by LSE.

use strata_kernels::attention::{AttentionQuery, attend_batch};
use strata_kernels::{AttentionGeometry, Backend, KvBlockView, KvBuf, Partial, RopeTable};

use crate::forward::ForwardError;
use crate::kv::{FarBlock, TierQuery};
use crate::model::{Family, ModelConfig};

/// The weights recompute needs from one layer.
pub struct KvProjection<'a, W> {
    pub norm: &'a W,
    pub norm_b: Option<&'a W>,
    pub k: &'a W,
    pub k_b: Option<&'a W>,
    pub v: &'a W,
    pub v_b: Option<&'a W>,
}

/// The layer's projection of hidden states back to K and V: what recompute needs to repeat the
/// token's first pass through the layer.
pub struct Regenerate<'a, W> {
    pub w: KvProjection<'a, W>,
    pub cfg: &'a ModelConfig,
    pub rope: &'a RopeTable,
}

impl<W> Regenerate<'_, W> {
    /// K and V `[tokens, kv_heads * head_dim]` of hidden states `x: [tokens, d_model]` at
    /// `positions`: the layer's input norm, its K and V projections (with their biases) and RoPE
    /// at each token's original position, on the backend that computes.
    pub fn kv<B: Backend<Weight = W>>(
        &self,
        b: &B,
        x: &B::Tensor,
        positions: &[usize],
    ) -> strata_kernels::Result<(B::Tensor, B::Tensor)> {
        let (w, cfg) = (&self.w, self.cfg);
        let h = match w.norm_b {
            Some(bias) => b.layer_norm(x, w.norm, bias, cfg.norm_eps)?,
            None => b.rms_norm(x, w.norm, cfg.norm_eps)?,
        };
        let mut k = b.linear(&h, w.k, w.k_b)?;
        let v = b.linear(&h, w.v, w.v_b)?;
        if cfg.family != Family::Opt {
            b.rope(&mut k, cfg.kv_heads, positions, self.rope)?;
        }
        Ok((k, v))
    }
}

/// Turns every hidden block of `far` that came in hand (`data`) into a KV block
/// (`[2, kv_heads, block_tokens, head_dim]` in the block's `kv_dtype`, rounded as an append would
/// have stored it) in place, in one batch of projections, and returns the tokens recomputed.
/// Hidden blocks still in their host slots (`in_host`) are left for the device, which copies
/// them into its scratch blocks and regenerates them there
/// ([`crate::kv::KvCache::attend_device`]).
pub(crate) fn recompute<B: Backend>(
    b: &B,
    regen: &Regenerate<'_, B::Weight>,
    block_tokens: usize,
    far: &mut [FarBlock],
) -> Result<usize, ForwardError> {
    let cfg = regen.cfg;
    let hidden: Vec<usize> = (0..far.len())
        .filter(|&i| far[i].hidden && far[i].in_host.is_none())
        .collect();
    let tokens: usize = hidden.iter().map(|&i| far[i].len).sum();
    if tokens == 0 {
        return Ok(0);
    }
    // x: [tokens, hidden], rows of the hidden blocks in order.
    let mut x = Vec::with_capacity(tokens * cfg.hidden);
    let mut positions = Vec::with_capacity(tokens);
    for &i in &hidden {
        let (at, n) = (x.len(), far[i].len * cfg.hidden);
        x.resize(at + n, 0.0);
        far[i].data.as_slice().slice(0..n).widen_into(&mut x[at..]);
        positions.extend(far[i].start_pos..far[i].start_pos + far[i].len);
    }
    let x = b.tensor(tokens, cfg.hidden, x)?;
    let (k, v) = regen.kv(b, &x, &positions)?;
    let (kh, vh) = (b.to_host(&k)?, b.to_host(&v)?);
    let (hd, kvd) = (cfg.head_dim, cfg.kv_heads * cfg.head_dim);
    let e = cfg.kv_heads * block_tokens * hd;
    let mut row = 0;
    for &i in &hidden {
        let f = &mut far[i];
        let mut data = vec![0.0f32; 2 * e];
        for t in 0..f.len {
            for head in 0..cfg.kv_heads {
                let src = (row + t) * kvd + head * hd;
                let dst = (head * block_tokens + t) * hd;
                data[dst..dst + hd].copy_from_slice(&kh[src..src + hd]);
                data[e + dst..e + dst + hd].copy_from_slice(&vh[src..src + hd]);
            }
        }
        row += f.len;
        f.data = KvBuf::from_f32(f.kv_dtype, &data);
        f.hidden = false;
    }
    Ok(tokens)
}

/// Attends every query over the far KV blocks of its sequence (host compute): one partial per
/// query, empty where its sequence has none.
pub(crate) fn attend_far(
    queries: &[TierQuery<'_>],
    far: &[FarBlock],
    ag: &AttentionGeometry,
) -> Vec<Partial> {
    if far.is_empty() {
        return queries
            .iter()
            .map(|_| Partial::empty(ag.n_heads, ag.head_dim))
            .collect();
    }
    let e = ag.block_elems();
    let views: Vec<Vec<KvBlockView<'_>>> = queries
        .iter()
        .map(|q| {
            far.iter()
                .filter(|f| f.seq == q.seq && !f.hidden)
                .map(|f| KvBlockView {
                    k: f.data.as_slice().slice(0..e),
                    v: f.data.as_slice().slice(e..2 * e),
                    start_pos: f.start_pos,
                    len: f.len,
                })
                .collect()
        })
        .collect();
    let aq: Vec<AttentionQuery<'_>> = queries
        .iter()
        .zip(&views)
        .map(|(q, v)| AttentionQuery {
            q: q.q,
            pos: q.pos,
            blocks: v,
        })
        .collect();
    let max_blocks = views.iter().map(Vec::len).max().unwrap_or(1).max(1);
    attend_batch(&aq, ag, max_blocks)
}
