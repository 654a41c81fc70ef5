//! Attention over KV blocks, as mergeable partials.
//!
//! A KV block holds `block_tokens` consecutive tokens of one sequence in one layer, K and V each
//! laid out `[kv_heads, block_tokens, head_dim]` in the dtype its tier stores (f32, f16 or bf16,
//! see [`crate::kv`]); half-precision values are widened to f32 as they are read, and all
//! arithmetic is f32. Any set of blocks — one block, the blocks of
//! one tier, a chunk handed to one thread — attends to a query and yields a [`Partial`]
//! `(o, lse)` per head: `o` is the softmax-weighted mean of V over those tokens and `lse` the
//! log-sum-exp of their scaled scores. [`Partial::merge`] combines partials exactly (DESIGN.md):
//! `M = max lse_i, w_i = exp(lse_i - M), o = Σ w_i o_i / Σ w_i, lse = M + ln Σ w_i`, and an empty
//! partial (`lse = -inf`) contributes nothing. This is the contract every tier will honour.
//!
//! Queries are causal: a query at position `p` sees only tokens at positions `<= p`.

use rayon::prelude::*;

use crate::kv::KvSlice;
use crate::simd::dot;

/// The shape facts every attention kernel needs. Grouped-query attention maps query head `h` to
/// KV head `h / (n_heads / n_kv_heads)`; KV is never replicated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionGeometry {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
    /// Multiplies `q·k` before the softmax (usually `1/sqrt(head_dim)`).
    pub scale: f32,
}

impl AttentionGeometry {
    pub fn block_elems(&self) -> usize {
        self.n_kv_heads * self.block_tokens * self.head_dim
    }
}

/// A read-only view of one KV block: `k`, `v: [kv_heads, block_tokens, head_dim]` (f32, f16 or
/// bf16; K and V in the same dtype), of which the first `len` token slots are filled, holding
/// positions `start_pos .. start_pos + len`.
#[derive(Clone, Copy, Debug)]
pub struct KvBlockView<'a> {
    pub k: KvSlice<'a>,
    pub v: KvSlice<'a>,
    pub start_pos: usize,
    pub len: usize,
}

/// `o: [n_heads, head_dim] f32`, `lse: [n_heads] f32` (natural log; `-inf` when no token was seen).
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

impl Partial {
    pub fn empty(n_heads: usize, head_dim: usize) -> Self {
        Self {
            o: vec![0.0; n_heads * head_dim],
            lse: vec![f32::NEG_INFINITY; n_heads],
        }
    }

    /// Folds `other` (over tokens disjoint from `self`'s) into `self`: the running form of
    /// [`Partial::merge`], for engines that attend block by block or tier by tier.
    pub fn merge_in(&mut self, other: Partial) {
        let (n_heads, head_dim) = (self.lse.len(), self.o.len() / self.lse.len().max(1));
        let this = std::mem::replace(
            self,
            Partial {
                o: Vec::new(),
                lse: Vec::new(),
            },
        );
        *self = Partial::merge(&[this, other], n_heads, head_dim);
    }

    /// Merges partials over disjoint token sets into the partial over their union.
    pub fn merge(parts: &[Partial], n_heads: usize, head_dim: usize) -> Partial {
        let mut out = Partial::empty(n_heads, head_dim);
        for h in 0..n_heads {
            let m = parts
                .iter()
                .map(|p| p.lse[h])
                .fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let o = &mut out.o[h * head_dim..(h + 1) * head_dim];
            let mut total = 0.0f32;
            for p in parts {
                let w = (p.lse[h] - m).exp();
                if w == 0.0 {
                    continue;
                }
                total += w;
                for (acc, x) in o.iter_mut().zip(&p.o[h * head_dim..(h + 1) * head_dim]) {
                    *acc += w * x;
                }
            }
            for x in o.iter_mut() {
                *x /= total;
            }
            out.lse[h] = m + total.ln();
        }
        out
    }
}

/// `exp(x)` to about 2e-7 relative error, branch-free so it vectorises: `2^n · e^r` with
/// `n = round(x / ln 2)` and a degree-6 polynomial for `e^r` on `|r| ≤ ln 2 / 2` (Cephes' `expf`
/// coefficients). Inputs below -87.3 give about 1e-38 (treated as zero weight by the softmax).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in any vector width.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Attends one query `q: [n_heads, head_dim]` at position `q_pos` over `blocks`, single-threaded.
///
/// Runs the AVX2+FMA build of the kernel when the CPU has it (checked at run time, so one binary
/// serves every x86-64 machine), the portable build otherwise.
pub fn attend_partial(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `attend_partial_avx2` only requires AVX2 and FMA, which the CPU was just
        // checked to have.
        return unsafe { attend_partial_avx2(q, q_pos, blocks, g) };
    }
    attend_partial_portable(q, q_pos, blocks, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_partial_avx2(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    attend_partial_portable(q, q_pos, blocks, g)
}

/// The kernel. For each KV head, the query heads of its group are processed together, so each
/// K and V row is read once per group (GQA without replicating KV). Within a block, all scores
/// come first; then the running max is updated once per block (one rescale of the accumulators
/// per block, not per token); then the exponentials are taken as one vectorised pass; then V is
/// accumulated. Half-precision K and V rows of a block are widened into a block-sized f32 buffer
/// first (one pass, in cache), then go through the same f32 loops as f32 blocks, which read
/// their values in place.
#[inline(always)]
fn attend_partial_portable(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    let hd = g.head_dim;
    let bt = g.block_tokens;
    let group = g.n_heads / g.n_kv_heads;
    let mut out = Partial::empty(g.n_heads, hd);
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut sum = vec![0.0f32; group];
    // scores: [group, block_tokens]
    let mut scores = vec![0.0f32; group * bt];
    // [block_tokens, head_dim] widened K and V of one KV head of one block (unused for f32).
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    for kvh in 0..g.n_kv_heads {
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        let heads = kvh * group..(kvh + 1) * group;
        let qg = &q[heads.start * hd..heads.end * hd];
        let acc = &mut out.o[heads.start * hd..heads.end * hd];
        let base = kvh * bt * hd;
        for b in blocks {
            let visible = b.len.min((q_pos + 1).saturating_sub(b.start_pos));
            if visible == 0 {
                continue;
            }
            let rows = base..base + visible * hd;
            let kb = b.k.slice(rows.clone()).as_f32(&mut kbuf);
            for (t, k) in kb.chunks_exact(hd).enumerate() {
                for i in 0..group {
                    scores[i * bt + t] = dot(&qg[i * hd..(i + 1) * hd], k) * g.scale;
                }
            }
            for i in 0..group {
                let s = &mut scores[i * bt..i * bt + visible];
                let block_max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                if block_max > max[i] {
                    let c = fast_exp(max[i] - block_max);
                    sum[i] *= c;
                    acc[i * hd..(i + 1) * hd].iter_mut().for_each(|a| *a *= c);
                    max[i] = block_max;
                }
                let m = max[i];
                s.iter_mut().for_each(|x| *x = fast_exp(*x - m));
                sum[i] += s.iter().sum::<f32>();
            }
            let vb = b.v.slice(rows).as_f32(&mut vbuf);
            for (t, v) in vb.chunks_exact(hd).enumerate() {
                for i in 0..group {
                    let p = scores[i * bt + t];
                    acc[i * hd..(i + 1) * hd]
                        .iter_mut()
                        .zip(v)
                        .for_each(|(a, x)| *a += p * x);
                }
            }
        }
        for i in 0..group {
            if sum[i] > 0.0 {
                acc[i * hd..(i + 1) * hd]
                    .iter_mut()
                    .for_each(|a| *a /= sum[i]);
                out.lse[heads.start + i] = max[i] + sum[i].ln();
            }
        }
    }
    out
}

/// One query of a batch: `q: [n_heads, head_dim]` at `pos`, over its sequence's blocks.
#[derive(Clone, Copy, Debug)]
pub struct AttentionQuery<'a> {
    pub q: &'a [f32],
    pub pos: usize,
    pub blocks: &'a [KvBlockView<'a>],
}

/// Attends every query, in parallel over queries and over chunks of `chunk_blocks` blocks each
/// (flash-decoding on the CPU: batch 1 at long context still keeps every core busy), then merges
/// each query's chunk partials. Returns one merged partial per query, in order.
pub fn attend_batch(
    queries: &[AttentionQuery<'_>],
    g: &AttentionGeometry,
    chunk_blocks: usize,
) -> Vec<Partial> {
    let chunk_blocks = chunk_blocks.max(1);
    let tasks: Vec<(usize, &[KvBlockView<'_>])> = queries
        .iter()
        .enumerate()
        .flat_map(|(i, q)| {
            let visible = visible_blocks(q.blocks, q.pos);
            let chunks: Vec<_> = visible.chunks(chunk_blocks).map(move |c| (i, c)).collect();
            if chunks.is_empty() {
                vec![(i, &visible[..0])]
            } else {
                chunks
            }
        })
        .collect();
    let partials: Vec<(usize, Partial)> = tasks
        .par_iter()
        .map(|&(i, blocks)| (i, attend_partial(queries[i].q, queries[i].pos, blocks, g)))
        .collect();
    let mut per_query: Vec<Vec<Partial>> = vec![Vec::new(); queries.len()];
    for (i, p) in partials {
        per_query[i].push(p);
    }
    per_query
        .into_par_iter()
        .map(|parts| match parts.len() {
            1 => parts
                .into_iter()
                .next()
                .unwrap_or_else(|| Partial::empty(g.n_heads, g.head_dim)),
            _ => Partial::merge(&parts, g.n_heads, g.head_dim),
        })
        .collect()
}

/// Drops trailing blocks that start after `pos` (causal: the query cannot see them).
fn visible_blocks<'a>(blocks: &'a [KvBlockView<'a>], pos: usize) -> &'a [KvBlockView<'a>] {
    let n = blocks.iter().take_while(|b| b.start_pos <= pos).count();
    &blocks[..n]
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_accurate_where_softmax_uses_it() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = (-87.0 + 88.0 * i as f64 / 200_000.0) as f32;
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "max relative error {worst:e}");
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(fast_exp(0.0), 1.0);
    }
}
