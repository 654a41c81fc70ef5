//! Attention over KV blocks, as mergeable partials.
//!
//! A KV block holds `block_tokens` consecutive tokens of one sequence in one layer, K and V each
//! laid out `[kv_heads, block_tokens, head_dim] f32`. Any set of blocks — one block, the blocks of
//! one tier, a chunk handed to one thread — attends to a query and yields a [`Partial`]
//! `(o, lse)` per head: `o` is the softmax-weighted mean of V over those tokens and `lse` the
//! log-sum-exp of their scaled scores. [`Partial::merge`] combines partials exactly (DESIGN.md):
//! `M = max lse_i, w_i = exp(lse_i - M), o = Σ w_i o_i / Σ w_i, lse = M + ln Σ w_i`, and an empty
//! partial (`lse = -inf`) contributes nothing. This is the contract every tier will honour.
//!
//! Queries are causal: a query at position `p` sees only tokens at positions `<= p`.

use rayon::prelude::*;

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
    fn kv_head_of(&self, head: usize) -> usize {
        head / (self.n_heads / self.n_kv_heads)
    }
}

/// A read-only view of one KV block: `k`, `v: [kv_heads, block_tokens, head_dim]`, of which the
/// first `len` token slots are filled, holding positions `start_pos .. start_pos + len`.
#[derive(Clone, Copy, Debug)]
pub struct KvBlockView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
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

/// Online-softmax state of one head while it streams over tokens.
struct HeadAccumulator<'a> {
    max: f32,
    sum: f32,
    acc: &'a mut [f32],
}

impl HeadAccumulator<'_> {
    #[inline]
    fn push(&mut self, score: f32, v: &[f32]) {
        if score > self.max {
            let correction = (self.max - score).exp();
            self.sum *= correction;
            for a in self.acc.iter_mut() {
                *a *= correction;
            }
            self.max = score;
        }
        let p = (score - self.max).exp();
        self.sum += p;
        for (a, x) in self.acc.iter_mut().zip(v) {
            *a += p * x;
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler keeps a vector register per lane group.
    let mut lanes = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            lanes[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = lanes.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Attends one query `q: [n_heads, head_dim]` at position `q_pos` over `blocks`, single-threaded.
pub fn attend_partial(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    let hd = g.head_dim;
    let mut out = Partial::empty(g.n_heads, hd);
    for (h, acc) in out.o.chunks_exact_mut(hd).enumerate() {
        let qh = &q[h * hd..(h + 1) * hd];
        let kvh = g.kv_head_of(h);
        let mut state = HeadAccumulator {
            max: f32::NEG_INFINITY,
            sum: 0.0,
            acc,
        };
        for b in blocks {
            let visible = b.len.min((q_pos + 1).saturating_sub(b.start_pos));
            let base = kvh * g.block_tokens * hd;
            for t in 0..visible {
                let k = &b.k[base + t * hd..base + (t + 1) * hd];
                let v = &b.v[base + t * hd..base + (t + 1) * hd];
                state.push(dot(qh, k) * g.scale, v);
            }
        }
        if state.sum > 0.0 {
            let (max, sum) = (state.max, state.sum);
            for a in state.acc.iter_mut() {
                *a /= sum;
            }
            out.lse[h] = max + sum.ln();
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
