// Paged decode attention, split along the KV (flash-decoding), and the exact LSE merge.
//
// KV pool: blocks of `[2 (K, V), kv_heads, block_tokens, head_dim]` in T (f32, f16 or bf16);
// block_tables `[batch, max_blocks]` u32 block ids in position order; seq_lens `[batch]`.
// One decode query per sequence sees every one of its `seq_len` tokens.
//
// attn_decode_*: grid (splits, kv_heads * head_chunks, batch), WARPS warps: 8 for the
// specialised kernels of 2 to 4 query heads per CTA, 4 for a group of 1 (its 64 registers hold
// no more) and for the generic kernel (its shared memory). A CTA attends
// one split (a run of tokens, see split_range) of one sequence for ALL the query heads of one GQA group (at
// most GP of them; larger groups take several head chunks), so each K and V row is read once per
// group. Each lane owns VEC = 16 / sizeof(T) consecutive dims of one token (one 16-byte load of K
// and one of V); LPT lanes cover a token, TPW tokens share a warp step; scores are reduced over
// the LPT lanes with shuffles, transposed where the step's GP * ATTN_UNROLL scores per token
// sub-group equal LPT (each lane ends with one whole score; see transposed_sum). Softmax is
// online in f32, in base 2 (q is pre-scaled by scale * log2 e). The warps of a CTA are merged through shared memory into a partial `(o, lse)`
// per (sequence, head, split), lse in natural log, -inf (and o = 0) when empty.
// - One split: the partial is the result, written to (out_o, out_lse).
// - Several: partials go to part_o [rows, splits, dim] / part_lse [rows, splits]; the CTAs of one
//   (sequence, head chunk) column count their arrivals in `arrivals[column]` (after a fence), and
//   the last to arrive merges the column's splits into (out_o, out_lse) and resets its counter to
//   0 for the next launch (the host zeroes the counters once, when it allocates them). One launch
//   per decode: no merge kernel, and the merge of a column starts as soon as its splits are done.
//
// The merge (in the split kernel and attn_merge_parts, one row at a time) is the formula of
// Partial::merge: M = max lse_i, w_i = exp(lse_i - M), o = sum w_i o_i / sum w_i,
// lse = M + ln sum w_i; parts with w_i = 0 contribute nothing (not even a NaN). attn_merge_parts
// finds M first; the fused merge keeps a running M and rescales its sums when M grows (one pass
// over L2), so the two agree to rounding, not bit for bit.

#define ATTN_WARPS 4
#define ATTN_UNROLL 4
#define ATTN_GENERIC_MAX_DIM 256
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// Programmatic dependent launch (sm_90 and later; no-ops before, and when the launch did not
// allow it). launch_dependents lets the next kernel of the stream start its CTAs as this one's
// finish; wait blocks until every kernel before this one has completed and its writes are
// visible. Nothing a kernel before may have written is read before the wait.
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lines of K and V each thread asks L2 to fetch before the wait: the start of the CTA's split.
#define ATTN_PREFETCH_LINES 4

// Eight f16 / bf16 or four f32 values of one 16-byte load, widened to f32.
__device__ __forceinline__ void widen(const uint4& r, float* out, const f16*) {
    const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f16 lo, hi;
        lo.bits = (unsigned short)(w[i] & 0xffffu);
        hi.bits = (unsigned short)(w[i] >> 16);
        out[2 * i] = to_f32(lo);
        out[2 * i + 1] = to_f32(hi);
    }
}

__device__ __forceinline__ void widen(const uint4& r, float* out, const bf16*) {
    const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void widen(const uint4& r, float* out, const float*) {
    out[0] = __uint_as_float(r.x);
    out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z);
    out[3] = __uint_as_float(r.w);
}

// 2^x without exp2f's rescaling for results below 2^-126: such a weight, beside the running
// max's weight of 1, adds nothing to any f32 sum. -inf gives 0, as exp2f does.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// A transposed warp sum of N values per lane over the lanes that differ in bits O, O/2, ..., 1.
// While a lane holds two or more values, each level halves them: the lane with bit O set keeps the
// upper half, the other the lower, each adding its partner's copy of the half it keeps. Once one
// is left, the remaining levels add it butterfly-wise. A butterfly over all N values would
// leave every sum in every lane at N shuffles a level; this takes N - 1 in all while N lanes or
// more take part. Afterwards, with L = 2 * O lanes: N >= L leaves each lane N / L sums, value j
// of lane c being sum number j + (N / L) * c; N < L leaves one, sum number c / (L / N).
template <int N, int O>
__device__ __forceinline__ void transposed_sum(float* v, u32 lane) {
    if constexpr (O >= 1) {
        if constexpr (N >= 2) {
            const bool upper = (lane & O) != 0;
#pragma unroll
            for (int i = 0; i < N / 2; i++) {
                const float send = upper ? v[i] : v[i + N / 2];
                const float keep = upper ? v[i + N / 2] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
            }
            transposed_sum<N / 2, O / 2>(v, lane);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
            transposed_sum<1, O / 2>(v, lane);
        }
    }
}

// The lane (of a token's L lanes) that ends transposed_sum<N, L / 2> with sum number `pair`.
template <int N, int L>
__device__ __forceinline__ u32 pair_lane(int pair) {
    return N >= L ? pair / (N / L) : pair * (L / N);
}

// Splits are whole runs of ATTN_SPLIT_TOKENS tokens, not whole blocks: every kernel finds each
// token's block itself, so a split may start mid-block, and a split count need not divide the
// blocks (33 splits of a 32K context fill 264 CTA slots, where whole 32-token blocks leave 33
// splits of 32 blocks, one empty). SPLIT_TOKENS in attention.rs.
#define ATTN_SPLIT_TOKENS 16

// Which tokens a CTA covers: split `s` of `splits` over `len` tokens.
__device__ __forceinline__ void split_range(u32 len, u32 splits, u32 s, u32* t0, u32* t1) {
    u64 per = ((u64)len + splits - 1) / splits;
    per = (per + ATTN_SPLIT_TOKENS - 1) / ATTN_SPLIT_TOKENS * ATTN_SPLIT_TOKENS;
    const u64 a = (u64)s * per;
    const u64 b = a + per;
    *t0 = (u32)(a < len ? a : len);
    *t1 = (u32)(b < len ? b : len);
}

// Merges the `splits` partials of rows row0 .. row0 + g_count (the CTA's column) into
// (out_o, out_lse), with the whole CTA, in one pass over L2: each thread owns VEC dims of one row
// (one 16-byte load per split when VEC is 4) and a run of the splits, loads UNROLL splits' lse
// and o at once, and keeps a running max M, sum w_i and sum w_i o_i (rescaled when M grows, the
// online softmax). When the column has fewer (row, VEC dims) positions than the CTA has threads,
// the splits are cut into `slices` runs, one thread per (position, run), and the runs are merged
// in order through shared memory: every thread loads. The partials were written by other CTAs
// of this launch: they are read through L2 (__ldcg), never from a stale L1 line.
template <int VEC, int UNROLL, int WARPS>
__device__ void cta_merge_splits(u32 dim, u32 g_count, float* out_o, float* out_lse,
                                 const float* part_o, const float* part_lse, u64 row0,
                                 u32 splits) {
    __shared__ float s_red[WARPS * 32 * VEC], s_red_m[WARPS * 32], s_red_l[WARPS * 32];
    const u32 per_row = dim / VEC;
    const u32 positions = g_count * per_row;
    const u32 slices = positions < blockDim.x ? min(blockDim.x / positions, splits) : 1u;
    const u32 per_slice = (splits + slices - 1) / slices;
    for (u32 idx = threadIdx.x; idx < positions * slices; idx += blockDim.x) {
        const u32 pos = idx % positions, slice = idx / positions;
        const u32 d = (pos % per_row) * VEC;
        const u64 row = row0 + pos / per_row;
        const u32 i_end = min(splits, (slice + 1) * per_slice);
        const float* pl = part_lse + row * splits;
        const float* po = part_o + row * splits * dim + d;
        float mx = NEG_INF, total = 0.0f, o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; j++) o[j] = 0.0f;
        for (u32 i0 = slice * per_slice; i0 < i_end; i0 += UNROLL) {
            // UNROLL splits' loads first (all in flight), then their sums in order; a split past
            // the run has lse -inf, so weight 0, and is skipped like an empty one.
            float lw[UNROLL], v[UNROLL][VEC];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const u32 i = i0 + u;
                lw[u] = i < i_end ? __ldcg(pl + i) : NEG_INF;
                if (VEC == 4) {
                    float4 r = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    if (i < i_end) r = __ldcg(reinterpret_cast<const float4*>(po + (u64)i * dim));
                    v[u][0] = r.x;
                    v[u][1 % VEC] = r.y;
                    v[u][2 % VEC] = r.z;
                    v[u][3 % VEC] = r.w;
                } else {
                    v[u][0] = i < i_end ? __ldcg(po + (u64)i * dim) : 0.0f;
                }
            }
            float m_new = mx;
#pragma unroll
            for (int u = 0; u < UNROLL; u++) m_new = fmaxf(m_new, lw[u]);
            if (m_new == NEG_INF) continue;
            const float corr = expf(mx - m_new);
            mx = m_new;
            total *= corr;
#pragma unroll
            for (int j = 0; j < VEC; j++) o[j] *= corr;
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const float w = expf(lw[u] - mx);
                if (w != 0.0f) {
                    total += w;
#pragma unroll
                    for (int j = 0; j < VEC; j++) o[j] = fmaf(w, v[u][j], o[j]);
                }
            }
        }
        if (slices > 1) {
#pragma unroll
            for (int j = 0; j < VEC; j++) s_red[idx * VEC + j] = o[j];
            s_red_m[idx] = mx;
            s_red_l[idx] = total;
            continue;
        }
#pragma unroll
        for (int j = 0; j < VEC; j++) out_o[row * dim + d + j] = mx != NEG_INF ? o[j] / total : 0.0f;
        if (d == 0) out_lse[row] = mx != NEG_INF ? mx + logf(total) : NEG_INF;
    }
    if (slices == 1) return;
    __syncthreads();
    for (u32 pos = threadIdx.x; pos < positions; pos += blockDim.x) {
        const u32 d = (pos % per_row) * VEC;
        const u64 row = row0 + pos / per_row;
        float mx = NEG_INF;
        for (u32 sl = 0; sl < slices; sl++) mx = fmaxf(mx, s_red_m[sl * positions + pos]);
        float total = 0.0f, o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; j++) o[j] = 0.0f;
        if (mx != NEG_INF) {
            for (u32 sl = 0; sl < slices; sl++) {
                const u32 at = sl * positions + pos;
                const float c = expf(s_red_m[at] - mx);
                if (c == 0.0f) continue;
                total = fmaf(c, s_red_l[at], total);
#pragma unroll
                for (int j = 0; j < VEC; j++) o[j] = fmaf(c, s_red[at * VEC + j], o[j]);
            }
        }
#pragma unroll
        for (int j = 0; j < VEC; j++) out_o[row * dim + d + j] = mx != NEG_INF ? o[j] / total : 0.0f;
        if (d == 0) out_lse[row] = mx != NEG_INF ? mx + logf(total) : NEG_INF;
    }
}

// The CTA's WARPS warps each hold (m, l, acc) over their tokens in base-2 units; merges them and
// writes the CTA's partial (see the header for where). s_m, s_l: [WARPS][GP];
// s_acc: [WARPS][GP][dim]. MERGE_UNROLL: splits the merge loads at once (see
// cta_merge_splits), chosen per kernel so that its register budget holds them without spilling.
template <int GP, int MERGE_UNROLL, int WARPS>
__device__ void cta_finish(float* s_m, float* s_l, const float* s_acc, u32 dim, u32 g_count,
                           float* out_o, float* out_lse, float* part_o, float* part_lse,
                           u32* arrivals, u64 row0, u32 splits, u32 split) {
    __shared__ u32 s_last;
    float* dst_o = splits == 1 ? out_o : part_o;
    float* dst_lse = splits == 1 ? out_lse : part_lse;
    for (u32 idx = threadIdx.x; idx < g_count * dim; idx += blockDim.x) {
        const u32 g = idx / dim, d = idx % dim;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, s_m[w * GP + g]);
        float l = 0.0f, o = 0.0f;
        if (mx != NEG_INF) {
#pragma unroll
            for (int w = 0; w < WARPS; w++) {
                const float c = exp2f(s_m[w * GP + g] - mx);
                l = fmaf(c, s_l[w * GP + g], l);
                o = fmaf(c, s_acc[(w * GP + g) * dim + d], o);
            }
        }
        const u64 row = (row0 + g) * splits + split;
        dst_o[row * dim + d] = l > 0.0f ? o / l : 0.0f;
        if (d == 0) dst_lse[row] = l > 0.0f ? (mx + log2f(l)) * ATTN_LN2 : NEG_INF;
    }
    if (splits == 1) return;
    // Publish this split, then count it; the last of the column merges them all.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 column = blockIdx.z * gridDim.y + blockIdx.y;
        const u32 before = atomicAdd(arrivals + column, 1u);
        s_last = before == splits - 1;
        if (s_last) arrivals[column] = 0;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    if ((dim & 3u) == 0) {
        cta_merge_splits<4, MERGE_UNROLL, WARPS>(dim, g_count, out_o, out_lse, part_o, part_lse,
                                                 row0, splits);
    } else {
        cta_merge_splits<1, MERGE_UNROLL, WARPS>(dim, g_count, out_o, out_lse, part_o, part_lse,
                                                 row0, splits);
    }
}

// The specialised kernel: head_dim D with D * sizeof(T) a multiple of 16 and D / VEC lanes
// (a power of two, at most 32) per token.
template <typename T, int D, int GP, int WARPS>
__device__ void attn_decode_fast(float* __restrict__ out_o, float* __restrict__ out_lse,
                                 float* part_o, float* part_lse, u32* arrivals,
                                 const float* __restrict__ q, const T* __restrict__ pool,
                                 const u32* __restrict__ block_tables,
                                 const u32* __restrict__ seq_lens, u32 max_blocks, u32 n_heads,
                                 u32 kv_heads, u32 bt, u32 splits, float scale_log2) {
    constexpr int VEC = 16 / sizeof(T);
    constexpr int LPT = D / VEC;
    constexpr int TPW = 32 / LPT;
    constexpr int STEP = TPW * ATTN_UNROLL;
    __shared__ float s_m[WARPS * GP], s_l[WARPS * GP];
    __shared__ float s_acc[WARPS * GP * D];

    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 ts = lane / LPT, c = lane % LPT;
    const u32 split = blockIdx.x, b = blockIdx.z;
    const u32 group = n_heads / kv_heads;
    const u32 chunks = (group + GP - 1) / GP;
    const u32 kvh = blockIdx.y / chunks, hc = blockIdx.y % chunks;
    const u32 g_count = min((u32)GP, group - hc * GP);
    const u64 row0 = (u64)b * n_heads + kvh * group + hc * GP;
    u32 t0, t1;
    split_range(seq_lens[b], splits, split, &t0, &t1);

    const u64 half_block = (u64)kv_heads * bt * D;  // elements of K (or V) in one block
    const u64 head_off = (u64)kvh * bt * D + c * VEC;
    const u32* table = block_tables + (u64)b * max_blocks;
    const bool pow2 = (bt & (bt - 1)) == 0;
    const u32 shift = __popc(bt - 1);

    // While the kernel before may still run: ask L2 for the first lines of this split's K and V
    // (block tables and lengths are uploaded by copies, which completed before it started; L2
    // is where every write lands, so a line fetched early is never stale), so the split's first
    // loads after the wait hit L2 and the DRAM works through the previous kernel's tail.
    pdl_launch_dependents();
    {
        constexpr u32 LINE_ELEMS = 128 / sizeof(T);
        const u32 head_lines = bt * D / LINE_ELEMS;  // lines of one head's K in one block
        // Blocks the split touches (it may start and end mid-block).
        const u32 blocks = t1 > t0 ? (t1 - 1) / bt - t0 / bt + 1 : 0;
        const u32 lines = 2 * head_lines * blocks;   // K and V
        for (u32 i = 0; i < ATTN_PREFETCH_LINES; i++) {
            const u32 l = threadIdx.x + i * blockDim.x;
            if (l >= lines) break;
            const u32 blk_in = l / (2 * head_lines), r = l % (2 * head_lines);
            const u32 blk = (pow2 ? (t0 >> shift) : (t0 / bt)) + blk_in;
            const u64 off = (u64)table[blk] * 2 * half_block + (r >= head_lines ? half_block : 0) +
                            (u64)kvh * bt * D + (u64)(r % head_lines) * LINE_ELEMS;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(pool + off));
        }
    }
    pdl_wait();

    float qv[GP][VEC];
#pragma unroll
    for (int g = 0; g < GP; g++) {
#pragma unroll
        for (int i = 0; i < VEC; i++)
            qv[g][i] = (u32)g < g_count ? q[(row0 + g) * D + c * VEC + i] * scale_log2 : 0.0f;
    }
    float acc[GP][VEC];
#pragma unroll
    for (int g = 0; g < GP; g++) {
#pragma unroll
        for (int i = 0; i < VEC; i++) acc[g][i] = 0.0f;
    }

    // A warp step's STEP tokens start at a multiple of STEP (splits start at multiples of
    // ATTN_SPLIT_TOKENS, which STEP divides), so when STEP divides the block size they share one
    // block: one table entry per step, loaded a step ahead so that the KV loads never wait on it.
    const bool one_block = bt % STEP == 0;
    const u32 first = t0 + warp * STEP;
    u32 entry = one_block && first < t1 ? table[pow2 ? (first >> shift) : (first / bt)] : 0u;
    // The step's scores are summed transposed (transposed_sum): of the NP = GP * ATTN_UNROLL
    // (token, head) pairs of a token sub-group, pair i = u * GP + g, lane c of the LPT lanes ends
    // with PPL of them (pairs j + PPL * c), or with one that REP lanes share (pair c / REP). A
    // lane keeps the running max (shared by every lane of the head) and its own share of the
    // sum for each pair it ends with. The lanes of one head are those whose c agree below
    // LPT / ATTN_UNROLL (the lanes of the other tokens u above it, and the other sub-groups).
    constexpr int NP = GP * ATTN_UNROLL;
    constexpr int PPL = NP >= LPT ? NP / LPT : 1;
    constexpr int REP = NP >= LPT ? 1 : LPT / NP;
    constexpr int HEAD_LANES = LPT / ATTN_UNROLL;  // first lane offset between a head's lanes
    const u32 lane0 = ts * LPT;                     // this sub-group's first lane
    float m_own[PPL], l_own[PPL];
#pragma unroll
    for (int j = 0; j < PPL; j++) {
        m_own[j] = NEG_INF;
        l_own[j] = 0.0f;
    }
    for (u32 base = first; base < t1; base += WARPS * STEP) {
        const u32 next = base + WARPS * STEP;
        u32 next_entry = 0u;
        if (one_block && next < t1) next_entry = table[pow2 ? (next >> shift) : (next / bt)];
        uint4 kr[ATTN_UNROLL], vr[ATTN_UNROLL];
        bool ok[ATTN_UNROLL];
        // The lane's first token's K row; in one block, the others follow at fixed strides.
        const T* row0_k = pool + (u64)entry * 2 * half_block + head_off +
                          (u64)((pow2 ? (base & (bt - 1)) : (base % bt)) + ts) * D;
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            const u32 t = base + u * TPW + ts;
            ok[u] = t < t1;
            kr[u] = make_uint4(0, 0, 0, 0);
            vr[u] = make_uint4(0, 0, 0, 0);
            if (ok[u]) {
                const T* k_row = row0_k + u * TPW * D;
                if (!one_block) {
                    const u32 slot = pow2 ? (t & (bt - 1)) : (t % bt);
                    const u32 id = table[pow2 ? (t >> shift) : (t / bt)];
                    k_row = pool + (u64)id * 2 * half_block + head_off + (u64)slot * D;
                }
                kr[u] = *reinterpret_cast<const uint4*>(k_row);
                vr[u] = *reinterpret_cast<const uint4*>(k_row + half_block);
            }
        }
        entry = next_entry;
        float v[NP];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            float k[VEC];
            widen(kr[u], k, pool);
#pragma unroll
            for (int g = 0; g < GP; g++) {
                float p = 0.0f;
#pragma unroll
                for (int i = 0; i < VEC; i++) p = fmaf(qv[g][i], k[i], p);
                v[u * GP + g] = p;
            }
        }
        transposed_sum<NP, LPT / 2>(v, c);
        float p_own[PPL], corr[PPL];
#pragma unroll
        for (int j = 0; j < PPL; j++) {
            const u32 pair = NP >= LPT ? j + PPL * c : c / REP;
            const float s_own = base + (pair / GP) * TPW + ts < t1 ? v[j] : NEG_INF;
            // The head's max over its lanes. The step's first token is in range: it is finite.
            float mx = s_own;
#pragma unroll
            for (int o = HEAD_LANES; o < 32; o <<= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_new = fmaxf(m_own[j], mx);
            corr[j] = exp2_ftz(m_own[j] - m_new);
            p_own[j] = exp2_ftz(s_own - m_new);
            m_own[j] = m_new;
            l_own[j] = fmaf(l_own[j], corr[j], p_own[j]);
        }
        // PV: each lane needs the weight of every pair of its sub-group, and each head's
        // rescale, from the lanes that hold them (pair i: lane i / PPL, value i % PPL).
#pragma unroll
        for (int g = 0; g < GP; g++) {
            const float cg = __shfl_sync(0xffffffffu, corr[g % PPL], lane0 + pair_lane<NP, LPT>(g));
#pragma unroll
            for (int i = 0; i < VEC; i++) acc[g][i] *= cg;
        }
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            float vv[VEC];
            widen(vr[u], vv, pool);
#pragma unroll
            for (int g = 0; g < GP; g++) {
                const int pair = u * GP + g;
                const float pg = __shfl_sync(0xffffffffu, p_own[pair % PPL],
                                             lane0 + pair_lane<NP, LPT>(pair));
#pragma unroll
                for (int i = 0; i < VEC; i++) acc[g][i] = fmaf(pg, vv[i], acc[g][i]);
            }
        }
    }
    // Back to the per-head layout the merge below expects: each sub-group's sum of head g (over
    // its tokens' lanes) and the head's max, in every lane.
#pragma unroll
    for (int j = 0; j < PPL; j++) {
#pragma unroll
        for (int o = HEAD_LANES; o < LPT; o <<= 1)
            l_own[j] += __shfl_xor_sync(0xffffffffu, l_own[j], o);
    }
    float m[GP], l[GP];
#pragma unroll
    for (int g = 0; g < GP; g++) {
        m[g] = __shfl_sync(0xffffffffu, m_own[g % PPL], pair_lane<NP, LPT>(g));
        l[g] = __shfl_sync(0xffffffffu, l_own[g % PPL], lane0 + pair_lane<NP, LPT>(g));
    }

    // Sum the token sub-groups of the warp (same dims, same running max).
#pragma unroll
    for (int g = 0; g < GP; g++) {
#pragma unroll
        for (int o = LPT; o < 32; o <<= 1) {
            l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
            for (int i = 0; i < VEC; i++) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
        }
    }
    if (ts == 0) {
#pragma unroll
        for (int g = 0; g < GP; g++) {
#pragma unroll
            for (int i = 0; i < VEC; i++) s_acc[(warp * GP + g) * D + c * VEC + i] = acc[g][i];
            if (c == 0) {
                s_m[warp * GP + g] = m[g];
                s_l[warp * GP + g] = l[g];
            }
        }
    }
    __syncthreads();
    // Merge loads in flight: as many as the register budget holds without spilling (sm_90; a
    // group of 1 runs at 64 registers).
    constexpr int MERGE_UNROLL = GP == 1 ? 4 : (D >= 128 ? (sizeof(T) == 2 ? 16 : 8) : 4);
    cta_finish<GP, MERGE_UNROLL, WARPS>(s_m, s_l, s_acc, D, g_count, out_o, out_lse, part_o,
                                        part_lse, arrivals, row0, splits, split);
}

// The fallback: any head_dim up to ATTN_GENERIC_MAX_DIM, any alignment; one token per warp
// step, dims lane, lane + 32, ...; up to 8 query heads per CTA.
template <typename T>
__device__ void attn_decode_generic(float* __restrict__ out_o, float* __restrict__ out_lse,
                                    float* part_o, float* part_lse, u32* arrivals,
                                    const float* __restrict__ q, const T* __restrict__ pool,
                                    const u32* __restrict__ block_tables,
                                    const u32* __restrict__ seq_lens, u32 max_blocks,
                                    u32 n_heads, u32 kv_heads, u32 head_dim, u32 bt, u32 splits,
                                    float scale_log2) {
    constexpr int GP = 8;
    constexpr int DPL = ATTN_GENERIC_MAX_DIM / 32;
    __shared__ float s_m[ATTN_WARPS * GP], s_l[ATTN_WARPS * GP];
    __shared__ float s_acc[ATTN_WARPS * GP * ATTN_GENERIC_MAX_DIM];
    // Launched like the specialised kernels (they may overlap the kernel before): wait first.
    pdl_launch_dependents();
    pdl_wait();

    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 split = blockIdx.x, b = blockIdx.z;
    const u32 group = n_heads / kv_heads;
    const u32 chunks = (group + GP - 1) / GP;
    const u32 kvh = blockIdx.y / chunks, hc = blockIdx.y % chunks;
    const u32 g_count = min((u32)GP, group - hc * GP);
    const u64 row0 = (u64)b * n_heads + kvh * group + hc * GP;
    u32 t0, t1;
    split_range(seq_lens[b], splits, split, &t0, &t1);

    float qv[GP][DPL], m[GP], l[GP], acc[GP][DPL];
#pragma unroll
    for (int g = 0; g < GP; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            const u32 d = lane + 32 * j;
            qv[g][j] = ((u32)g < g_count && d < head_dim) ? q[(row0 + g) * head_dim + d] * scale_log2
                                                         : 0.0f;
            acc[g][j] = 0.0f;
        }
    }
    const u64 half_block = (u64)kv_heads * bt * head_dim;
    const u32* table = block_tables + (u64)b * max_blocks;
    for (u32 t = t0 + warp; t < t1; t += ATTN_WARPS) {
        const u64 off = (u64)table[t / bt] * 2 * half_block + ((u64)kvh * bt + t % bt) * head_dim;
        float k[DPL], v[DPL];
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            const u32 d = lane + 32 * j;
            k[j] = d < head_dim ? to_f32(pool[off + d]) : 0.0f;
            v[j] = d < head_dim ? to_f32(pool[off + half_block + d]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < GP; g++) {
            float p = 0.0f;
#pragma unroll
            for (int j = 0; j < DPL; j++) p = fmaf(qv[g][j], k[j], p);
            p = warp_sum(p);
            const float m_new = fmaxf(m[g], p);
            const float corr = exp2f(m[g] - m_new);
            const float e = exp2f(p - m_new);
            m[g] = m_new;
            l[g] = fmaf(l[g], corr, e);
#pragma unroll
            for (int j = 0; j < DPL; j++) acc[g][j] = fmaf(e, v[j], acc[g][j] * corr);
        }
    }
#pragma unroll
    for (int g = 0; g < GP; g++) {
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            const u32 d = lane + 32 * j;
            if (d < head_dim) s_acc[(warp * GP + g) * head_dim + d] = acc[g][j];
        }
        if (lane == 0) {
            s_m[warp * GP + g] = m[g];
            s_l[warp * GP + g] = l[g];
        }
    }
    __syncthreads();
    cta_finish<GP, 8, ATTN_WARPS>(s_m, s_l, s_acc, head_dim, g_count, out_o, out_lse, part_o,
                                  part_lse, arrivals, row0, splits, split);
}

// WARPS warps per CTA; MINB: CTAs per SM the kernel is held to (__launch_bounds__), the
// occupancy its main loop reaches on its own (sm_90: 64, 96 (2 CTAs of 8 warps hold 85) and 128
// registers for f16/bf16 groups of 1, 2, 4), so the merge tail never costs a resident CTA. The
// warps per group are FAST_WARPS in attention.rs. Groups of 5 to 8 run as CTAs of 4 heads over
// the same KV (its second read mostly from L2): on an H100 that ran groups of 8 up to 10% faster
// (1 × 4K; 64 × 32K level) than CTAs of 8 heads, whose 252 registers held one CTA per SM
// (bench/RESULTS.md, twenty-third session).
#define ATTN_FAST(NAME, T, D, GP, WARPS, MINB)                                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                              \
        NAME(float* out_o, float* out_lse, float* part_o, float* part_lse, u32* arrivals,      \
             const float* q, const T* pool, const u32* tables, const u32* lens, u32 max_blocks, \
             u32 n_heads, u32 kv_heads, u32 head_dim, u32 bt, u32 splits, float scale_log2) {   \
        attn_decode_fast<T, D, GP, WARPS>(out_o, out_lse, part_o, part_lse, arrivals, q, pool,   \
                                          tables, lens, max_blocks, n_heads, kv_heads, bt,       \
                                          splits, scale_log2);                                   \
    }

#define ATTN_FAST_ALL_GROUPS(TN, T, D, M1, M2, M4)          \
    ATTN_FAST(attn_decode_##TN##_d##D##_g1, T, D, 1, 4, M1) \
    ATTN_FAST(attn_decode_##TN##_d##D##_g2, T, D, 2, 8, M2) \
    ATTN_FAST(attn_decode_##TN##_d##D##_g4, T, D, 4, 8, M4)

ATTN_FAST_ALL_GROUPS(f32, float, 64, 8, 3, 2)
ATTN_FAST_ALL_GROUPS(f32, float, 128, 8, 3, 2)
ATTN_FAST_ALL_GROUPS(f16, f16, 64, 8, 2, 2)
ATTN_FAST_ALL_GROUPS(f16, f16, 128, 8, 2, 2)
ATTN_FAST_ALL_GROUPS(bf16, bf16, 64, 8, 2, 2)
ATTN_FAST_ALL_GROUPS(bf16, bf16, 128, 8, 2, 2)

#define ATTN_GENERIC(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)                               \
        NAME(float* out_o, float* out_lse, float* part_o, float* part_lse, u32* arrivals,      \
             const float* q, const T* pool, const u32* tables, const u32* lens, u32 max_blocks, \
             u32 n_heads, u32 kv_heads, u32 head_dim, u32 bt, u32 splits, float scale_log2) {   \
        attn_decode_generic<T>(out_o, out_lse, part_o, part_lse, arrivals, q, pool, tables,     \
                               lens, max_blocks, n_heads, kv_heads, head_dim, bt, splits,       \
                               scale_log2);                                                     \
    }

ATTN_GENERIC(attn_decode_f32_generic, float)
ATTN_GENERIC(attn_decode_f16_generic, f16)
ATTN_GENERIC(attn_decode_bf16_generic, bf16)

// Merges `n` partials of one row; part i's lse is lse_at(i) and its o[d] is o_at(i, d).
template <typename LseAt, typename OAt>
__device__ void merge_row(u32 n, u32 dim, LseAt lse_at, OAt o_at, float* o_out, float* lse_out) {
    const u32 lane = threadIdx.x & 31u;
    float mx = NEG_INF;
    for (u32 i = lane; i < n; i += 32) mx = fmaxf(mx, lse_at(i));
    mx = warp_max(mx);
    if (mx == NEG_INF) {
        for (u32 d = lane; d < dim; d += 32) o_out[d] = 0.0f;
        if (lane == 0) *lse_out = NEG_INF;
        return;
    }
    float total = 0.0f;
    for (u32 i = lane; i < n; i += 32) total += expf(lse_at(i) - mx);
    total = warp_sum(total);
    for (u32 d = lane; d < dim; d += 32) {
        float o = 0.0f;
        for (u32 i = 0; i < n; i++) {
            const float w = expf(lse_at(i) - mx);
            if (w != 0.0f) o = fmaf(w, o_at(i, d), o);
        }
        o_out[d] = o / total;
    }
    if (lane == 0) *lse_out = mx + logf(total);
}

// Partials in separate buffers: o_ptrs[i] -> [rows, dim], lse_ptrs[i] -> [rows].
extern "C" __global__ void attn_merge_parts(float* o, float* lse, const u64* o_ptrs,
                                            const u64* lse_ptrs, u32 n, u32 rows, u32 dim) {
    const u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    merge_row(
        n, dim, [&](u32 i) { return ((const float*)lse_ptrs[i])[row]; },
        [&](u32 i, u32 d) { return ((const float*)o_ptrs[i])[row * dim + d]; }, o + row * dim,
        lse + row);
}

// Two partials passed by address (the device's and the host tiers', a decode layer's merge):
// attn_merge_parts without its pointer arrays, so the host uploads nothing to launch it.
extern "C" __global__ void attn_merge_two(float* o, float* lse, const float* o0, const float* l0,
                                          const float* o1, const float* l1, u32 rows, u32 dim) {
    const u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    merge_row(
        2u, dim, [&](u32 i) { return (i == 0 ? l0 : l1)[row]; },
        [&](u32 i, u32 d) { return (i == 0 ? o0 : o1)[row * dim + d]; }, o + row * dim,
        lse + row);
}

// The HBM read floor the decode bench compares with: a pure streaming read of `n_vec` 16-byte
// vectors, grid-stride, READ_UNROLL loads in flight per thread, folded with XOR. The fold is
// written only when it equals a constant (never, in practice), so the loads cannot be dropped and
// the kernel writes nothing.
#define READ_UNROLL 4
extern "C" __global__ void hbm_read_floor(const uint4* __restrict__ src, u64 n_vec, u32* sink) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u32 acc = 0;
    for (; i + (READ_UNROLL - 1) * stride < n_vec; i += READ_UNROLL * stride) {
        uint4 r[READ_UNROLL];
#pragma unroll
        for (int u = 0; u < READ_UNROLL; u++) r[u] = src[i + u * stride];
#pragma unroll
        for (int u = 0; u < READ_UNROLL; u++) acc ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
    }
    for (; i < n_vec; i += stride) {
        const uint4 r = src[i];
        acc ^= r.x ^ r.y ^ r.z ^ r.w;
    }
    if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;
}
