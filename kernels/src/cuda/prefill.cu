// Causal prefill attention over the paged KV pool, FlashAttention-2 style.
//
// Inputs (see prefill.rs for the host side):
// - pool: blocks `[2 (K, V), kv_heads, bt, head_dim]` in T;
// - paged tables, CSR by sequence: blk_ids / blk_starts `[entries]` (block id, position of its
//   first token; starts strictly increasing and multiples of bt), seq_first `[batch + 1]`,
//   seq_tokens `[batch]` (valid tokens over the listed blocks: all full but the last);
// - query rows: q `[rows, n_heads * head_dim]` f32, row_pos `[rows]`, and tiles `[n_tiles, 8]`
//   u32 = (row0, nrows, b, min_pos, max_pos, 0, 0, 0): runs of at most BM consecutive rows of
//   one sequence with increasing positions.
// A key at position p is seen by a query at position pos iff p <= pos. Output: o
// `[rows, n_heads * head_dim]` and lse `[rows, n_heads]` (natural log; -inf, o = 0 when a row
// sees no key), as the decode kernel.
//
// prefill_mma_*: one CTA per (tile, query head), 4 warps of 16 (r64) or 32 (r128) query rows.
// Q is loaded once (f32, pre-scaled by scale * log2 e, rounded to T) into shared memory, and
// for r64 from there into registers as mma A fragments. Key tiles of PF_BN = 64 slots of the
// listed blocks (in list order, so position gaps cost nothing) are copied with cp.async into
// shared memory (two stages; rows of 16-byte chunks XOR-swizzled so ldmatrix is conflict-free;
// slots past the valid tokens are zero-filled); S = Q K^T and O += P V run on tensor cores
// (mma.sync m16n8k16, T inputs, f32 accumulators; r128 feeds each K/V fragment to two m-tiles),
// and the softmax is online in f32, base 2. Key tiles start at the first listed block and stop
// at the last one that starts at or before the tile's last position; a warp skips a key tile
// that starts after its last row, and masks (per element, by position) only the tiles that end
// after its first row. Slot addresses and positions of key tile j + 2 are computed into shared
// memory while tile j runs. GQA: query head h reads KV head h / (n_heads / kv_heads); the CTAs
// of one tile's heads are adjacent in the grid, so a group's K/V tiles are read from L2.
//
// prefill_generic_*: any head_dim up to PF_GENERIC_MAX_DIM, any dtype, no tensor cores (f32
// pools, odd head dims, GPUs before sm_80): one warp per query row, f32 math.

#define PF_BN 64
#define PF_NONE 0xffffffffu
#define PF_GENERIC_MAX_DIM 256
#define PF_LN2 0.6931471805599453f

// The tensor-core prefill kernels' parameters (mma.sync here, wgmma in prefill_hopper.cu), and
// the same names passed on to the templates behind them.
#define PF_TC_PARAMS(T)                                                                       \
    float *out_o, float *out_lse, const float *q, const T *pool, const u32 *tiles,           \
        const u32 *row_pos, const u32 *blk_ids, const u32 *blk_starts, const u32 *seq_first, \
        const u32 *seq_tokens, u32 n_heads, u32 kv_heads, u32 bt, float scale_log2
#define PF_TC_ARGS                                                                            \
    out_o, out_lse, q, pool, tiles, row_pos, blk_ids, blk_starts, seq_first, seq_tokens,      \
        n_heads, kv_heads, bt, scale_log2

__device__ __forceinline__ u32 pf_smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ float pf_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#if __CUDA_ARCH__ >= 800

// 16 bytes global -> shared, bypassing L1; `src_bytes` 0 fills the destination with zeros.
__device__ __forceinline__ void pf_cp_async16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void pf_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void pf_cp_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

__device__ __forceinline__ void pf_ldsm_x4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void pf_ldsm_x4_t(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b on one 16x8x16 tile; a: 4 regs (16x16, row), b: 2 regs (16x8, col), c: 4 f32.
__device__ __forceinline__ void pf_mma(float* c, const u32* a, u32 b0, u32 b1, const f16*) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void pf_mma(float* c, const u32* a, u32 b0, u32 b1, const bf16*) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 rounded (to nearest even) into one register, `lo` in the low half.
__device__ __forceinline__ u32 pf_pack(float lo, float hi, const f16*) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 pf_pack(float lo, float hi, const bf16*) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Byte offset of 16-byte chunk `ch` of row `r` in a tile of rows of D elements of 2 bytes.
template <int D>
__device__ __forceinline__ u32 pf_swz(u32 r, u32 ch) {
    return r * (D * 2) + ((ch ^ (r & 7u)) << 4);
}

// Q's f32 values 4 c .. 4 c + 3 of the tile's rows (row-major, D per row), zero for a row past
// the tile (of `nrows`); the tensor-core kernels here and in prefill_hopper.cu load Q so. Thread
// t takes c = t + i * threads: a warp's loads cover whole 32-byte sectors (two loads of one
// thread's 8 consecutive values would each use half of every sector they touch).
template <int D>
__device__ __forceinline__ float4 pf_load_q4(const float* q, u32 c, u32 row0, u32 nrows,
                                             u64 q_stride, u32 h) {
    const u32 r = c / (D / 4), c4 = c % (D / 4);
    if (r >= nrows) return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    return *reinterpret_cast<const float4*>(q + (row0 + r) * q_stride + h * D + 4 * c4);
}

// Those 4 values scaled and rounded to T: the 8 bytes that Q's shared copy holds at byte
// `((c % (D / 4)) & 1) * 8` of the 16-byte chunk `(c % (D / 4)) / 2` of row `c / (D / 4)`.
template <typename T>
__device__ __forceinline__ uint2 pf_pack_q4(float4 x, float scale, const T* t) {
    return make_uint2(pf_pack(x.x * scale, x.y * scale, t), pf_pack(x.z * scale, x.w * scale, t));
}

// The number of entries of the increasing `starts[0 .. n)` that are at most `x`, by one warp
// (every lane must call it, with the same arguments): each round the 32 lanes probe evenly
// spaced entries at once, so a search over n entries waits for ceil(log32 n) loads, not log2 n.
__device__ __forceinline__ u32 pf_count_at_most(const u32* starts, u32 n, u32 x) {
    const u32 lane = threadIdx.x & 31u;
    u32 lo = 0, hi = n;  // the count lies in [lo, hi]
    while (lo < hi) {
        const u32 step = (hi - lo + 31u) / 32u;
        const u32 i = lo + lane * step;
        const bool le = i < hi && starts[i] <= x;
        const u32 k = __popc(__ballot_sync(0xffffffffu, le));  // the probes at most x: a prefix
        if (k == 0) break;
        const u32 next_lo = lo + (k - 1) * step + 1;
        hi = min(hi, lo + k * step);
        lo = next_lo;
    }
    return lo;
}

// Key slots of sequence b that a tile whose last row sits at `max_pos` reads: those of the
// listed blocks (from `first`, `n_listed` of them) that start at or before max_pos (starts
// increase), at most the sequence's `tokens`. Called by whole warps (pf_count_at_most).
__device__ __forceinline__ u32 pf_listed_slots(const u32* blk_starts, u32 first, u32 n_listed,
                                               u32 max_pos, u32 bt, u32 tokens) {
    return min(pf_count_at_most(blk_starts + first, n_listed, max_pos) * bt, tokens);
}

// Key slot `s`'s position and K row in the pool (in rows of head_dim elements; its V row is
// kv_heads * bt further), both PF_NONE for a slot past `n_slots`.
__device__ __forceinline__ void pf_slot(u32 s, u32 n_slots, const u32* blk_starts,
                                        const u32* blk_ids, u32 first, u32 bt, u32 kv_heads,
                                        u32 kvh, u32& kpos, u32& krow) {
    kpos = PF_NONE;
    krow = PF_NONE;
    if (s < n_slots) {
        const u32 e = s / bt, o = s - e * bt;
        kpos = blk_starts[first + e] + o;
        krow = (blk_ids[first + e] * 2 * kv_heads + kvh) * bt + o;
    }
}

// What a CTA's key tiles cover, for a tile of sequence `b` whose last row sits at `max_pos`:
// the sequence's first listed entry, the key slots the tile reads (pf_listed_slots; every
// thread must call this), and, for threads s = tid < bn, the slots of key tiles 0 and 1
// (slots s and bn + s, bounded by the listed blocks only). Those are looked up before the
// search ends, so that their loads wait beside the search's instead of behind it;
// pf_first_slots_store then bounds them by the slot count into slot buffers 0 and 1 (layout
// `[buf][bn]`).
struct PfFirstSlots {
    u32 kpos[2], krow[2];
};
struct PfTileKeys {
    u32 first, n_slots;
    PfFirstSlots slots;
};
__device__ __forceinline__ PfTileKeys pf_tile_keys(u32 tid, u32 bn, u32 b, u32 max_pos,
                                                   const u32* seq_first, const u32* seq_tokens,
                                                   const u32* blk_starts, const u32* blk_ids,
                                                   u32 bt, u32 kv_heads, u32 kvh) {
    PfTileKeys k;
    k.first = seq_first[b];
    const u32 n_listed = seq_first[b + 1] - k.first;
    if (tid < bn) {
#pragma unroll
        for (int t = 0; t < 2; t++)
            pf_slot(t * bn + tid, n_listed * bt, blk_starts, blk_ids, k.first, bt, kv_heads, kvh,
                    k.slots.kpos[t], k.slots.krow[t]);
    }
    k.n_slots = pf_listed_slots(blk_starts, k.first, n_listed, max_pos, bt, seq_tokens[b]);
    return k;
}
__device__ __forceinline__ void pf_first_slots_store(const PfFirstSlots& f, u32 s, u32 bn,
                                                     u32 n_slots, u32* s_kpos, u32* s_krow) {
#pragma unroll
    for (int t = 0; t < 2; t++) {
        const bool in = t * bn + s < n_slots;
        s_kpos[t * bn + s] = in ? f.kpos[t] : PF_NONE;
        s_krow[t * bn + s] = in ? f.krow[t] : PF_NONE;
    }
}

// The end of a tensor-core prefill CTA, for one row a quad of lanes (t4 = 0..3) holds: sums
// the row's softmax denominator over the quad (every lane takes part, row in range or not),
// then, for a row in range, writes the lane's D/4 outputs normalised (`pair(n)` gives its two
// values of columns 8n + 2 t4 and 8n + 2 t4 + 1) and, from lane t4 == 0, the row's LSE in
// natural-log units (`m`, the running max, is in log2 units).
template <int D, class Pair>
__device__ __forceinline__ void pf_store_row(float* out_o, float* out_lse, u64 row, bool in_range,
                                             u64 q_stride, u32 n_heads, u32 h, u32 t4, float l,
                                             float m, Pair pair) {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (!in_range) return;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* dst = out_o + row * q_stride + h * D + 2 * t4;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        const float2 v = pair(n);
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(v.x * inv, v.y * inv);
    }
    if (t4 == 0) out_lse[row * n_heads + h] = l > 0.0f ? (m + log2f(l)) * PF_LN2 : NEG_INF;
}

// W warps of MT m-tiles (16 rows each): a CTA takes BM = 16 W MT query rows. With MT = 1 the
// warp keeps its Q fragments in registers (Q's shared copy then lives in stage 1 of the K/V
// ring until the loop overwrites it); with MT = 2 each K/V fragment read from shared memory
// feeds two mma (half the shared-memory traffic per FLOP) and Q is read from shared memory.
template <typename T, int D, int W, int MT>
__device__ __forceinline__ void prefill_mma(
    float* __restrict__ out_o, float* __restrict__ out_lse, const float* __restrict__ q,
    const T* __restrict__ pool, const u32* __restrict__ tiles, const u32* __restrict__ row_pos,
    const u32* __restrict__ blk_ids, const u32* __restrict__ blk_starts,
    const u32* __restrict__ seq_first, const u32* __restrict__ seq_tokens, u32 n_heads,
    u32 kv_heads, u32 bt, float scale_log2) {
    constexpr int WR = 16 * MT;  // rows per warp
    constexpr int BM = W * WR;
    constexpr int THREADS = 32 * W;
    constexpr bool QREG = MT == 1;
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int KT = D / 16;  // k-steps of S = Q K^T
    constexpr int ND = D / 8;   // n8 tiles of O
    constexpr u32 ROW_BYTES = D * 2;
    constexpr u32 TILE_BYTES = PF_BN * ROW_BYTES;
    constexpr u32 STAGE = 2 * TILE_BYTES;
    static_assert(!QREG || BM * ROW_BYTES <= STAGE, "Q must fit in one K/V stage");
    extern __shared__ __align__(128) unsigned char pf_smem[];
    // Stages 0, 1: K [PF_BN][D] then V [PF_BN][D] | krow u32 [2][PF_BN] | kpos u32 [2][PF_BN] |
    // Q [BM][D] (unless QREG). krow: the slot's K row in the pool, in rows of D elements (its V
    // row is kv_heads * bt further), PF_NONE for a slot past the valid tokens; kpos: its
    // position, PF_NONE likewise.
    u32* s_krow = reinterpret_cast<u32*>(pf_smem + 2 * STAGE);
    u32* s_kpos = s_krow + 2 * PF_BN;
    unsigned char* s_q = QREG ? pf_smem + STAGE : pf_smem + 2 * STAGE + 4 * PF_BN * 4;
    const u32 base = pf_smem_addr(pf_smem);
    const u32 q_base = pf_smem_addr(s_q);

    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 g = lane >> 2, t4 = lane & 3u;
    const u32 h = blockIdx.x % n_heads, tile = blockIdx.x / n_heads;
    const uint4 td = reinterpret_cast<const uint4*>(tiles)[2 * (u64)tile];
    const u32 row0 = td.x, nrows = td.y, b = td.z;
    const u32 max_pos = tiles[8 * (u64)tile + 4];
    const u32 kvh = h / (n_heads / kv_heads);

    // The loads that depend only on the tile go first, so that they are in flight during the
    // chain of dependent loads below (tables, search, slot addresses): Q (f32; rows past
    // the tile are zero), the positions of this thread's rows (wr + 16 mt + g, and + 8; rows
    // past the tile take its last position, computed, never stored) and of the warp's first and
    // last rows.
    constexpr int Q4 = BM * (D / 4) / THREADS;  // float4 of Q per thread
    const u64 q_stride = (u64)n_heads * D;
    float4 qx[Q4];
#pragma unroll
    for (int i = 0; i < Q4; i++)
        qx[i] = pf_load_q4<D>(q, tid + i * THREADS, row0, nrows, q_stride, h);
    const u32 wr = warp * WR;
    const bool warp_rows = wr < nrows;
    const u32 last_row = nrows - 1;
    u32 pos[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        pos[mt][0] = row_pos[row0 + min(wr + 16 * mt + g, last_row)];
        pos[mt][1] = row_pos[row0 + min(wr + 16 * mt + g + 8, last_row)];
    }
    const u32 warp_min = row_pos[row0 + min(wr, last_row)];
    const u32 warp_max = row_pos[row0 + min(wr + WR - 1, last_row)];

    const PfTileKeys keys = pf_tile_keys(tid, PF_BN, b, max_pos, seq_first, seq_tokens,
                                         blk_starts, blk_ids, bt, kv_heads, kvh);
    const u32 first = keys.first, n_slots = keys.n_slots;
    const u32 n_ktiles = (n_slots + PF_BN - 1) / PF_BN;
    const u32 v_rows = kv_heads * bt;  // from a K row to its V row

    // Slot addresses and positions of key tile `kt` into buffer `buf` (threads 0 .. PF_BN-1).
    auto slot_info = [&](u32 kt, u32 buf) {
        if (tid < PF_BN)
            pf_slot(kt * PF_BN + tid, n_slots, blk_starts, blk_ids, first, bt, kv_heads, kvh,
                    s_kpos[buf * PF_BN + tid], s_krow[buf * PF_BN + tid]);
    };
    // K (extra = 0) or V (extra = v_rows) of the tile described in `buf`, into `dst`. Every
    // chunk a thread copies is chunk `tid % CPR` of its row (THREADS is a multiple of CPR). The
    // slot rows are read first: the compiler keeps shared loads behind a preceding asm.
    const T* pool_ch = pool + (tid % CPR) * 8;
    constexpr int LOADS = PF_BN * CPR / THREADS;
    auto load_kv = [&](u32 buf, u32 dst, u32 extra) {
        u32 krow[LOADS];
#pragma unroll
        for (int i = 0; i < LOADS; i++) krow[i] = s_krow[buf * PF_BN + (tid + i * THREADS) / CPR];
#pragma unroll
        for (int i = 0; i < LOADS; i++) {
            const u32 c = tid + i * THREADS;
            const u32 r = c / CPR, ch = c % CPR;
            const bool valid = krow[i] != PF_NONE;
            const T* src = pool_ch + (u64)(valid ? krow[i] + extra : 0u) * D;
            pf_cp_async16(dst + pf_swz<D>(r, ch), src, valid ? 16u : 0u);
        }
    };

    // Key tile 0 is requested before Q is stored, so that its copy overlaps that work.
    if (tid < PF_BN) pf_first_slots_store(keys.slots, tid, PF_BN, n_slots, s_kpos, s_krow);
    __syncthreads();
    if (n_ktiles > 0) load_kv(0, base, 0);
    pf_cp_commit();
    if (n_ktiles > 0) load_kv(0, base + TILE_BYTES, v_rows);
    pf_cp_commit();
    // Q, scaled and rounded to T (zero rows stay zero).
#pragma unroll
    for (int i = 0; i < Q4; i++) {
        const u32 c = tid + i * THREADS, c4 = c % (D / 4);
        *reinterpret_cast<uint2*>(s_q + pf_swz<D>(c / (D / 4), c4 >> 1) + (c4 & 1u) * 8) =
            pf_pack_q4(qx[i], scale_log2, pool);
    }
    __syncthreads();

    // ldmatrix lanes: Q and V (transposed) rows r0 + (lane & 7) + 8 ((lane >> 3) & 1), chunk
    // 2 k + (lane >> 4); K rows key0 + (lane & 7) + 8 (lane >> 4), chunk 2 kk + ((lane >> 3) & 1).
    const u32 a_row = (lane & 7u) + ((lane >> 3) & 1u) * 8, a_ch = lane >> 4;
    const u32 k_row = (lane & 7u) + (lane >> 4) * 8, k_ch = (lane >> 3) & 1u;

    u32 qf[QREG ? KT : 1][4];
    if (QREG) {
#pragma unroll
        for (int kk = 0; kk < KT; kk++)
            pf_ldsm_x4(q_base + pf_swz<D>(wr + a_row, 2 * kk + a_ch), qf[QREG ? kk : 0]);
    }

    float o[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < ND; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) m[mt][0] = m[mt][1] = NEG_INF, l[mt][0] = l[mt][1] = 0.0f;

    for (u32 j = 0; j < n_ktiles; j++) {
        const u32 buf = j & 1u;
        pf_cp_wait1();  // K of tile j has landed
        __syncthreads();
        if (j + 1 < n_ktiles) load_kv(buf ^ 1u, base + (buf ^ 1u) * STAGE, 0);
        pf_cp_commit();

        const u32 kmin = s_kpos[buf * PF_BN];
        const u32 kmax = s_kpos[buf * PF_BN + PF_BN - 1];
        const bool active = warp_rows && kmin <= warp_max;
        float s[MT][8][4];
        if (active) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
            const u32 kb = base + buf * STAGE;
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
                u32 qa[MT][4];
                if (!QREG) {
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
                        pf_ldsm_x4(q_base + pf_swz<D>(wr + 16 * mt + a_row, 2 * kk + a_ch), qa[mt]);
                }
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    u32 r[4];
                    pf_ldsm_x4(kb + pf_swz<D>(np * 16 + k_row, 2 * kk + k_ch), r);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        const u32* a = QREG ? qf[QREG ? kk : 0] : qa[mt];
                        pf_mma(s[mt][2 * np], a, r[0], r[1], pool);
                        pf_mma(s[mt][2 * np + 1], a, r[2], r[3], pool);
                    }
                }
            }
            if (kmax > warp_min) {  // some key of the tile is after some row of the warp
#pragma unroll
                for (int n = 0; n < 8; n++) {
                    const uint2 kp =
                        *reinterpret_cast<const uint2*>(s_kpos + buf * PF_BN + n * 8 + 2 * t4);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        if (kp.x > pos[mt][0]) s[mt][n][0] = NEG_INF;
                        if (kp.y > pos[mt][0]) s[mt][n][1] = NEG_INF;
                        if (kp.x > pos[mt][1]) s[mt][n][2] = NEG_INF;
                        if (kp.y > pos[mt][1]) s[mt][n][3] = NEG_INF;
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {  // rows g (hf 0) and g + 8 (hf 1)
                    float t[8];  // pairwise: short dependency chains
#pragma unroll
                    for (int n = 0; n < 8; n++) t[n] = fmaxf(s[mt][n][2 * hf], s[mt][n][2 * hf + 1]);
                    float mx = fmaxf(fmaxf(fmaxf(t[0], t[1]), fmaxf(t[2], t[3])),
                                     fmaxf(fmaxf(t[4], t[5]), fmaxf(t[6], t[7])));
                    mx = fmaxf(mx, m[mt][hf]);
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    // A row that has seen nothing yet keeps max -inf: subtract 0 so that exp2
                    // gives 0, not NaN.
                    const float base_m = mx == NEG_INF ? 0.0f : mx;
                    const float corr = pf_exp2(m[mt][hf] - base_m);
                    m[mt][hf] = mx;
#pragma unroll
                    for (int n = 0; n < 8; n++) {
                        s[mt][n][2 * hf] = pf_exp2(s[mt][n][2 * hf] - base_m);
                        s[mt][n][2 * hf + 1] = pf_exp2(s[mt][n][2 * hf + 1] - base_m);
                        t[n] = s[mt][n][2 * hf] + s[mt][n][2 * hf + 1];
                    }
                    const float sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
                    l[mt][hf] = l[mt][hf] * corr + sum;
#pragma unroll
                    for (int n = 0; n < ND; n++) {
                        o[mt][n][2 * hf] *= corr;
                        o[mt][n][2 * hf + 1] *= corr;
                    }
                }
            }
        }

        pf_cp_wait1();  // V of tile j has landed
        __syncthreads();
        if (j + 1 < n_ktiles) load_kv(buf ^ 1u, base + (buf ^ 1u) * STAGE + TILE_BYTES, v_rows);
        pf_cp_commit();
        if (j + 2 < n_ktiles) slot_info(j + 2, buf);

        if (active) {
            const u32 vb = base + buf * STAGE + TILE_BYTES;
#pragma unroll
            for (int ks = 0; ks < 4; ks++) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    a[mt][0] = pf_pack(s[mt][2 * ks][0], s[mt][2 * ks][1], pool);
                    a[mt][1] = pf_pack(s[mt][2 * ks][2], s[mt][2 * ks][3], pool);
                    a[mt][2] = pf_pack(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1], pool);
                    a[mt][3] = pf_pack(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3], pool);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    u32 r[4];
                    pf_ldsm_x4_t(vb + pf_swz<D>(ks * 16 + a_row, 2 * dp + a_ch), r);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        pf_mma(o[mt][2 * dp], a[mt], r[0], r[1], pool);
                        pf_mma(o[mt][2 * dp + 1], a[mt], r[2], r[3], pool);
                    }
                }
            }
        }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");

#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const u32 r = wr + 16 * mt + 8 * hf + g;
            const auto pair = [&](int n) {
                return make_float2(o[mt][n][2 * hf], o[mt][n][2 * hf + 1]);
            };
            pf_store_row<D>(out_o, out_lse, (u64)row0 + r, r < nrows, q_stride, n_heads, h, t4,
                            l[mt][hf], m[mt][hf], pair);
        }
    }
}

#define PF_MMA_BODY(T, D, W, MT) prefill_mma<T, D, W, MT>(PF_TC_ARGS);
#else
// Before sm_80 (no cp.async, no bf16 mma): the host runs the generic kernel instead.
#define PF_MMA_BODY(T, D, W, MT) __trap();
#endif

// NAME: prefill_mma_{dtype}_d{D}_r{rows per CTA}; MINB: CTAs per SM asked of the compiler.
#define PF_MMA(NAME, T, D, W, MT, MINB)                                                 \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB) NAME(PF_TC_PARAMS(T)) { \
        PF_MMA_BODY(T, D, W, MT)                                                        \
    }

#define PF_MMA_ALL(TN, T, D)                             \
    PF_MMA(prefill_mma_##TN##_d##D##_r64, T, D, 4, 1, 2) \
    PF_MMA(prefill_mma_##TN##_d##D##_r128, T, D, 4, 2, 1)

PF_MMA_ALL(f16, f16, 64)
PF_MMA_ALL(f16, f16, 128)
PF_MMA_ALL(bf16, bf16, 64)
PF_MMA_ALL(bf16, bf16, 128)

// The fallback: tiles as above (any size up to blockDim), one warp per row (rows warp,
// warp + warps, ...), dims lane, lane + 32, ...; walks the listed blocks in order and stops at
// the first key after the row's position.
template <typename T>
__device__ void prefill_generic(float* __restrict__ out_o, float* __restrict__ out_lse,
                                const float* __restrict__ q, const T* __restrict__ pool,
                                const u32* __restrict__ tiles, const u32* __restrict__ row_pos,
                                const u32* __restrict__ blk_ids,
                                const u32* __restrict__ blk_starts,
                                const u32* __restrict__ seq_first,
                                const u32* __restrict__ seq_tokens, u32 n_heads, u32 kv_heads,
                                u32 head_dim, u32 bt, float scale_log2) {
    constexpr int DPL = PF_GENERIC_MAX_DIM / 32;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const u32 h = blockIdx.x % n_heads, tile = blockIdx.x / n_heads;
    const u32 row0 = tiles[8 * (u64)tile], nrows = tiles[8 * (u64)tile + 1];
    const u32 b = tiles[8 * (u64)tile + 2];
    const u32 kvh = h / (n_heads / kv_heads);
    const u32 first = seq_first[b], n_listed = seq_first[b + 1] - first;
    const u32 total = seq_tokens[b];
    const u64 half_block = (u64)kv_heads * bt * head_dim;
    const u64 q_stride = (u64)n_heads * head_dim;

    for (u32 r = warp; r < nrows; r += warps) {
        const u64 row = row0 + r;
        const u32 pos = row_pos[row];
        float qv[DPL], acc[DPL];
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            const u32 d = lane + 32 * j;
            qv[j] = d < head_dim ? q[row * q_stride + h * head_dim + d] * scale_log2 : 0.0f;
            acc[j] = 0.0f;
        }
        float m = NEG_INF, l = 0.0f;
        for (u32 e = 0; e < n_listed; e++) {
            const u32 start = blk_starts[first + e];
            if (start > pos) break;
            const u32 cnt = min(bt, min(total - e * bt, pos - start + 1));
            const u64 base = (u64)blk_ids[first + e] * 2 * half_block + (u64)kvh * bt * head_dim;
            for (u32 t = 0; t < cnt; t++) {
                const u64 off = base + (u64)t * head_dim;
                float p = 0.0f;
#pragma unroll
                for (int j = 0; j < DPL; j++) {
                    const u32 d = lane + 32 * j;
                    if (d < head_dim) p = fmaf(qv[j], to_f32(pool[off + d]), p);
                }
                p = warp_sum(p);
                const float m_new = fmaxf(m, p);
                const float corr = exp2f(m - m_new);
                const float w = exp2f(p - m_new);
                m = m_new;
                l = fmaf(l, corr, w);
#pragma unroll
                for (int j = 0; j < DPL; j++) {
                    const u32 d = lane + 32 * j;
                    const float v = d < head_dim ? to_f32(pool[off + half_block + d]) : 0.0f;
                    acc[j] = fmaf(w, v, acc[j] * corr);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < DPL; j++) {
            const u32 d = lane + 32 * j;
            if (d < head_dim) out_o[row * q_stride + h * head_dim + d] = l > 0.0f ? acc[j] / l : 0.0f;
        }
        if (lane == 0) out_lse[row * n_heads + h] = l > 0.0f ? (m + log2f(l)) * PF_LN2 : NEG_INF;
    }
}

#define PF_GENERIC(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                         \
        NAME(float* out_o, float* out_lse, const float* q, const T* pool, const u32* tiles,   \
             const u32* row_pos, const u32* blk_ids, const u32* blk_starts,                   \
             const u32* seq_first, const u32* seq_tokens, u32 n_heads, u32 kv_heads,          \
             u32 head_dim, u32 bt, float scale_log2) {                                        \
        prefill_generic<T>(out_o, out_lse, q, pool, tiles, row_pos, blk_ids, blk_starts,      \
                           seq_first, seq_tokens, n_heads, kv_heads, head_dim, bt,            \
                           scale_log2);                                                       \
    }

PF_GENERIC(prefill_generic_f32, float)
PF_GENERIC(prefill_generic_f16, f16)
PF_GENERIC(prefill_generic_bf16, bf16)
