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
    /// The geometry with the usual softmax scale, `1 / sqrt(head_dim)`.
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize, block_tokens: usize) -> Self {
        Self {
            n_heads,
            n_kv_heads,
            head_dim,
            block_tokens,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

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

/// Which build of the host attention kernel runs. [`HostKernel::detect`] picks the fastest one
/// the CPU supports (checked at run time, so one binary serves every x86-64 machine); tests run
/// every one in [`HostKernel::available`] against the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKernel {
    /// Plain Rust for any CPU: scores one token at a time, f16/bf16 blocks widened into a
    /// buffer first.
    Portable,
    /// AVX2 + FMA: register-tiled `q·k` and `p·v`, bf16 widened as it is loaded; f16 blocks
    /// widened into a buffer first.
    Avx2,
    /// [`HostKernel::Avx2`] with F16C: f16 widened as it is loaded too.
    Avx2F16c,
}

impl HostKernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        [HostKernel::Avx2F16c, HostKernel::Avx2]
            .into_iter()
            .find(|k| k.is_supported())
            .unwrap_or(HostKernel::Portable)
    }

    /// Every kernel this CPU runs, slowest first ([`HostKernel::Portable`] always).
    pub fn available() -> Vec<Self> {
        [HostKernel::Portable, HostKernel::Avx2, HostKernel::Avx2F16c]
            .into_iter()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// Whether this CPU has the features the kernel needs (checked at run time; cached by std).
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                HostKernel::Portable => true,
                HostKernel::Avx2 => has!("avx2") && has!("fma"),
                HostKernel::Avx2F16c => has!("avx2") && has!("fma") && has!("f16c"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == HostKernel::Portable
        }
    }
}

/// Attends one query `q: [n_heads, head_dim]` at position `q_pos` over `blocks`, single-threaded,
/// with the fastest kernel the CPU supports ([`HostKernel::detect`]).
pub fn attend_partial(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    attend_partial_with(HostKernel::detect(), q, q_pos, blocks, g)
}

/// [`attend_partial`] with a chosen kernel. A kernel the CPU does not support runs as the
/// portable one; with a `head_dim` that is not a multiple of 8 (the AVX2 tiles' width) the AVX2
/// kernels run the portable kernel's code compiled for AVX2.
pub fn attend_partial_with(
    kernel: HostKernel,
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if kernel != HostKernel::Portable && kernel.is_supported() {
        return if !g.head_dim.is_multiple_of(8) {
            // SAFETY: the CPU was just checked to have AVX2 and FMA (every AVX2 kernel needs
            // them), all that `attend_partial_portable_avx2` requires.
            unsafe { attend_partial_portable_avx2(q, q_pos, blocks, g) }
        } else if kernel == HostKernel::Avx2F16c {
            // SAFETY: the CPU was just checked to have AVX2, FMA and F16C, all that
            // `attend_partial_avx2_f16c` requires.
            unsafe { attend_partial_avx2_f16c(q, q_pos, blocks, g) }
        } else {
            // SAFETY: the CPU was just checked to have AVX2 and FMA, all that
            // `attend_partial_avx2` requires.
            unsafe { attend_partial_avx2(q, q_pos, blocks, g) }
        };
    }
    let _ = kernel;
    attend_partial_portable(q, q_pos, blocks, g)
}

/// Tokens of `b` a query at `q_pos` sees (causal).
#[inline(always)]
fn visible_tokens(b: &KvBlockView<'_>, q_pos: usize) -> usize {
    b.len.min((q_pos + 1).saturating_sub(b.start_pos))
}

/// The online-softmax step of one block for one query head: `s` (the head's scaled scores over
/// the block's visible tokens) becomes `exp(s - max)` with `max` raised to the block's maximum
/// first, rescaling `acc` (the head's running `Σ p·v`, `[head_dim]`) and `sum` (its `Σ p`) once
/// when the maximum rises; then `sum` gains the block's weights.
#[inline(always)]
fn softmax_block(s: &mut [f32], max: &mut f32, sum: &mut f32, acc: &mut [f32]) {
    let block_max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if block_max > *max {
        let c = fast_exp(*max - block_max);
        *sum *= c;
        acc.iter_mut().for_each(|a| *a *= c);
        *max = block_max;
    }
    let m = *max;
    s.iter_mut().for_each(|x| *x = fast_exp(*x - m));
    *sum += s.iter().sum::<f32>();
}

/// The end of one query head: `acc` divided by the softmax's sum and the head's `lse`, or the
/// empty partial's zeros and `-inf` when it saw no token.
#[inline(always)]
fn finish_head(acc: &mut [f32], max: f32, sum: f32, lse: &mut f32) {
    if sum > 0.0 {
        acc.iter_mut().for_each(|a| *a /= sum);
        *lse = max + sum.ln();
    }
}

/// The portable kernel. For each KV head, the query heads of its group are processed together,
/// so each K and V row is read once per group (GQA without replicating KV). Within a block, all
/// scores come first; then the running max is updated once per block (one rescale of the
/// accumulators per block, not per token); then the exponentials are taken as one vectorised
/// pass; then V is accumulated. Half-precision K and V rows of a block are widened into a
/// block-sized f32 buffer first (one pass, in cache), then go through the same f32 loops as f32
/// blocks, which read their values in place.
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
            let visible = visible_tokens(b, q_pos);
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
                softmax_block(s, &mut max[i], &mut sum[i], &mut acc[i * hd..(i + 1) * hd]);
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
            let lse = &mut out.lse[heads.start + i];
            finish_head(&mut acc[i * hd..(i + 1) * hd], max[i], sum[i], lse);
        }
    }
    out
}

/// The portable kernel compiled for AVX2 + FMA (LLVM vectorises its loops 8 wide), for head
/// dims the AVX2 tiles do not take.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_partial_portable_avx2(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
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
    avx2::attend::<false>(q, q_pos, blocks, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_partial_avx2_f16c(
    q: &[f32],
    q_pos: usize,
    blocks: &[KvBlockView<'_>],
    g: &AttentionGeometry,
) -> Partial {
    avx2::attend::<true>(q, q_pos, blocks, g)
}

/// The AVX2 kernel's driver. Blocks are walked in order and, within a block, KV head by KV head
/// (each block's K and V are read front to back, and the next unit's rows are prefetched while
/// this one is computed); each (block, KV head) unit is the portable kernel's step — all scores,
/// one online-softmax step per query head, then `p·v` — with the scores and `p·v` done by the
/// register tiles of [`crate::simd::avx2`]. K and V are read in their stored dtype and widened
/// as they are loaded (f16 only with F16C; without it f16 rows are widened into a buffer first),
/// so a half-precision block goes through exactly the arithmetic of an f32 block holding the
/// same values and gives bit-identical partials.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::ops::Range;

    use half::{bf16, f16};

    use super::{AttentionGeometry, KvBlockView, Partial, finish_head, softmax_block};
    use crate::kv::KvSlice;
    use crate::simd::avx2::{Widen, prefetch, pv_tile, qk_tile};

    /// The running softmax of every query head, and one unit's scratch.
    struct State<'a> {
        /// `[n_heads]`: running max of the scaled scores, and `Σ exp(score - max)`.
        max: Vec<f32>,
        sum: Vec<f32>,
        /// `[group, block_tokens]`: one unit's scaled scores, then its weights.
        scores: Vec<f32>,
        /// The next unit's K and V rows, prefetched during this one.
        next: Option<(KvSlice<'a>, KvSlice<'a>)>,
    }

    /// One KV head of one block: `k`, `v: [visible, head_dim]` in the stored dtype `E`, and the
    /// query heads `heads` of its group: `q`, `acc: [group, head_dim]` (their running `Σ p·v`).
    struct Unit<'u, E> {
        heads: Range<usize>,
        q: &'u [f32],
        acc: &'u mut [f32],
        k: &'u [E],
        v: &'u [E],
        visible: usize,
    }

    /// Query heads per register tile: 4 (`q·k`: 4 heads × 2 tokens; `p·v`: 4 heads × 16
    /// columns), 2 (2 × 4; 2 × 32) or 1 (1 × 8; 1 × 64), the largest that divides the group.
    fn heads_per_tile(group: usize) -> usize {
        if group.is_multiple_of(4) {
            4
        } else if group.is_multiple_of(2) {
            2
        } else {
            1
        }
    }

    /// The AVX2 kernel's body; `F16C` says whether f16 may be widened in registers.
    ///
    /// Callers are compiled with AVX2 and FMA (and F16C when `F16C`), which the CPU was checked
    /// to have; `g.head_dim % 8 == 0`.
    #[inline(always)]
    pub(super) fn attend<const F16C: bool>(
        q: &[f32],
        q_pos: usize,
        blocks: &[KvBlockView<'_>],
        g: &AttentionGeometry,
    ) -> Partial {
        let (hd, bt) = (g.head_dim, g.block_tokens);
        let group = g.n_heads / g.n_kv_heads;
        let mut out = Partial::empty(g.n_heads, hd);
        let mut st = State {
            max: vec![f32::NEG_INFINITY; g.n_heads],
            sum: vec![0.0; g.n_heads],
            scores: vec![0.0; group * bt],
            next: None,
        };
        // [visible, head_dim] K and V of one unit widened, for f16 without F16C (or a block
        // whose K and V dtypes differ).
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        // The visible rows of KV head `kvh` of `b`, in values.
        let rows = |b: &KvBlockView<'_>, kvh: usize| {
            let base = kvh * bt * hd;
            base..base + super::visible_tokens(b, q_pos) * hd
        };
        for (bi, b) in blocks.iter().enumerate() {
            let visible = super::visible_tokens(b, q_pos);
            if visible == 0 {
                continue;
            }
            for kvh in 0..g.n_kv_heads {
                st.next = match (kvh + 1 < g.n_kv_heads, blocks.get(bi + 1)) {
                    (true, _) => Some((b.k.slice(rows(b, kvh + 1)), b.v.slice(rows(b, kvh + 1)))),
                    (false, Some(nb)) => Some((nb.k.slice(rows(nb, 0)), nb.v.slice(rows(nb, 0)))),
                    (false, None) => None,
                };
                let heads = kvh * group..(kvh + 1) * group;
                let q = &q[heads.start * hd..heads.end * hd];
                let acc = &mut out.o[heads.start * hd..heads.end * hd];
                let r = rows(b, kvh);
                match (b.k.slice(r.clone()), b.v.slice(r)) {
                    (KvSlice::F32(k), KvSlice::F32(v)) => {
                        let u = Unit {
                            heads,
                            q,
                            acc,
                            k,
                            v,
                            visible,
                        };
                        unit::<f32>(&mut st, u, g)
                    }
                    (KvSlice::BF16(k), KvSlice::BF16(v)) => {
                        let u = Unit {
                            heads,
                            q,
                            acc,
                            k,
                            v,
                            visible,
                        };
                        unit::<bf16>(&mut st, u, g)
                    }
                    (KvSlice::F16(k), KvSlice::F16(v)) if F16C => {
                        let u = Unit {
                            heads,
                            q,
                            acc,
                            k,
                            v,
                            visible,
                        };
                        unit::<f16>(&mut st, u, g)
                    }
                    (k, v) => {
                        let (k, v) = (k.as_f32(&mut kbuf), v.as_f32(&mut vbuf));
                        let u = Unit {
                            heads,
                            q,
                            acc,
                            k,
                            v,
                            visible,
                        };
                        unit::<f32>(&mut st, u, g)
                    }
                }
            }
        }
        for (i, (acc, lse)) in out.o.chunks_exact_mut(hd).zip(&mut out.lse).enumerate() {
            finish_head(acc, st.max[i], st.sum[i], lse);
        }
        out
    }

    /// Scores, the online-softmax step of each query head, then `p·v`, for one unit.
    #[inline(always)]
    fn unit<E: Widen>(st: &mut State<'_>, u: Unit<'_, E>, g: &AttentionGeometry) {
        let (hd, bt) = (g.head_dim, g.block_tokens);
        let group = u.heads.len();
        // The tiles read `visible` rows of `hd` values of `k` and `v`, `group` rows of `q` and
        // `acc`, and `visible` scores per head; check those extents once, here.
        assert!(
            hd.is_multiple_of(8)
                && u.k.len() == u.visible * hd
                && u.v.len() == u.visible * hd
                && u.q.len() == group * hd
                && u.acc.len() == group * hd
                && u.visible <= bt
                && st.scores.len() == group * bt,
            "attention unit: inconsistent shapes"
        );
        match heads_per_tile(group) {
            4 => scores::<E, 4, 2>(st, u.q, u.k, u.visible, g),
            2 => scores::<E, 2, 4>(st, u.q, u.k, u.visible, g),
            _ => scores::<E, 1, 8>(st, u.q, u.k, u.visible, g),
        }
        for (i, h) in u.heads.enumerate() {
            let s = &mut st.scores[i * bt..i * bt + u.visible];
            let acc = &mut u.acc[i * hd..(i + 1) * hd];
            softmax_block(s, &mut st.max[h], &mut st.sum[h], acc);
        }
        match heads_per_tile(group) {
            4 => weighted_values::<E, 4, 2>(st, u.acc, u.v, u.visible, g),
            2 => weighted_values::<E, 2, 4>(st, u.acc, u.v, u.visible, g),
            _ => weighted_values::<E, 1, 8>(st, u.acc, u.v, u.visible, g),
        }
    }

    /// `scores[h][t] = scale · q[h]·k[t]`, `H` heads × `T` tokens per tile. The last tile of a
    /// block that is not a multiple of `T` tokens repeats the last row and drops its extra sums.
    #[inline(always)]
    fn scores<E: Widen, const H: usize, const T: usize>(
        st: &mut State<'_>,
        qg: &[f32],
        k: &[E],
        visible: usize,
        g: &AttentionGeometry,
    ) {
        let (hd, bt) = (g.head_dim, g.block_tokens);
        let group = qg.len() / hd;
        for h0 in (0..group).step_by(H) {
            for t0 in (0..visible).step_by(T) {
                // Spread over the first head tile's token tiles: the next unit's rows `t0..t0+T`.
                if let (0, Some((nk, nv))) = (h0, st.next) {
                    prefetch_kv(nk, t0 * hd..(t0 + T) * hd);
                    prefetch_kv(nv, t0 * hd..(t0 + T) * hd);
                }
                let rows: [*const E; T] =
                    std::array::from_fn(|t| k[(t0 + t).min(visible - 1) * hd..].as_ptr());
                // SAFETY: `unit` checked `k` holds `visible` rows of `hd` values (each row
                // pointer starts a full row) and `hd % 8 == 0`; `qg[h0 * hd..]` holds `H` rows
                // because `H` divides `group`; the caller is compiled with AVX2 and FMA (and
                // F16C when `E` is f16).
                let s = unsafe { qk_tile::<E, H, T>(qg[h0 * hd..].as_ptr(), rows, hd) };
                for h in 0..H {
                    for t in 0..T.min(visible - t0) {
                        st.scores[(h0 + h) * bt + t0 + t] = s[h * T + t] * g.scale;
                    }
                }
            }
        }
    }

    /// Asks for the cache lines of `s[r]` (clamped to `s`): a hint, without effect on results.
    #[inline(always)]
    fn prefetch_kv(s: KvSlice<'_>, r: std::ops::Range<usize>) {
        match s {
            KvSlice::F32(s) => prefetch(s, r),
            KvSlice::F16(s) => prefetch(s, r),
            KvSlice::BF16(s) => prefetch(s, r),
        }
    }

    /// `acc[h] += Σ_t p[h][t] · v[t]`, `H` heads × `8W` columns per tile (then 8-column tiles
    /// for what is left of `head_dim`), each tile's outputs held in registers over the block.
    #[inline(always)]
    fn weighted_values<E: Widen, const H: usize, const W: usize>(
        st: &State<'_>,
        acc: &mut [f32],
        v: &[E],
        visible: usize,
        g: &AttentionGeometry,
    ) {
        let (hd, bt) = (g.head_dim, g.block_tokens);
        let group = acc.len() / hd;
        for h0 in (0..group).step_by(H) {
            let o = acc[h0 * hd..].as_mut_ptr();
            let p = st.scores[h0 * bt..].as_ptr();
            let mut d = 0;
            while d + 8 * W <= hd {
                // SAFETY: `unit` checked the extents: `acc` holds `group` rows of `hd`
                // (`H` divides `group`, `d + 8W <= hd`), `scores` holds `group` rows of `bt >=
                // visible`, `v` holds `visible` rows of `hd`; `acc` is borrowed mutably here
                // and by nothing else; the caller is compiled with AVX2 and FMA (and F16C when
                // `E` is f16).
                unsafe { pv_tile::<E, H, W>(o.add(d), hd, p, bt, v[d..].as_ptr(), visible) };
                d += 8 * W;
            }
            while d < hd {
                // SAFETY: as above, with `d + 8 <= hd` because `hd % 8 == 0`.
                unsafe { pv_tile::<E, H, 1>(o.add(d), hd, p, bt, v[d..].as_ptr(), visible) };
                d += 8;
            }
        }
    }
}

/// One query of a batch: `q: [n_heads, head_dim]` at `pos`, over its sequence's blocks.
#[derive(Clone, Copy, Debug)]
pub struct AttentionQuery<'a> {
    pub q: &'a [f32],
    pub pos: usize,
    pub blocks: &'a [KvBlockView<'a>],
}

/// Tasks per host thread [`split_chunk_blocks`] aims for. Equal tasks on `t` threads run in
/// `⌈tasks / t⌉` rounds, so the last round can leave most threads idle: at two tasks per thread,
/// 32 tasks on 15 threads take three rounds where 2.1 would do. More, smaller tasks bound that
/// loss (each costs one partial and its merge, a few microseconds).
pub const HOST_TASKS_PER_THREAD: usize = 4;

/// Blocks per chunk for [`attend_batch`] over `queries` queries of at most `max_blocks` blocks
/// each on `threads` threads: every query split evenly so that there are about
/// [`HOST_TASKS_PER_THREAD`] tasks per thread.
pub fn split_chunk_blocks(max_blocks: usize, queries: usize, threads: usize) -> usize {
    let splits = (HOST_TASKS_PER_THREAD * threads.max(1))
        .div_ceil(queries.max(1))
        .max(1);
    max_blocks.max(1).div_ceil(splits)
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

    /// Equal tasks run in whole rounds over the threads: the split keeps at least four tasks
    /// per thread, so the last round's idle threads cost at most a fifth of the time.
    #[test]
    fn host_splits_keep_the_threads_busy_to_the_last_round() {
        use super::split_chunk_blocks;
        for (blocks, queries, threads) in [(69, 8, 15), (69, 8, 16), (4096, 1, 15), (130, 3, 7)] {
            let chunk = split_chunk_blocks(blocks, queries, threads);
            let tasks = queries * blocks.div_ceil(chunk);
            let rounds = tasks.div_ceil(threads);
            assert!(
                tasks >= 4 * threads,
                "{blocks} {queries} {threads}: {tasks} tasks"
            );
            assert!(
                tasks as f64 / (rounds * threads) as f64 >= 0.8,
                "{tasks} in {rounds}"
            );
        }
        // Fewer blocks than tasks wanted: one block per task, never zero.
        assert_eq!(split_chunk_blocks(3, 8, 16), 1);
        assert_eq!(split_chunk_blocks(0, 0, 0), 1);
    }

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
