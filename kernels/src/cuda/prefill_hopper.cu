// Causal prefill attention on Hopper's warpgroup tensor cores (wgmma), for sm_90 only (the
// program is compiled for compute_90a there). Same inputs, outputs and tiles as prefill.cu's
// kernels; this file only changes how a tile is computed.
//
// prefill_wgmma{128,64,64k32}_{dtype}_d{64,128}: one CTA per (tile of query rows, query head).
// wgmma128: tiles of 128 rows, two warpgroups of 64, key tiles of BN = 128 slots, one CTA per SM
// (its registers); wgmma64: one warpgroup, 64 rows, key tiles of 64, half the shared memory, so
// that two CTAs share an SM and one's loads and stores run beside the other's products (short
// prompts, where a CTA's first loads and last stores are a large part of its time); wgmma64k32:
// wgmma64 with key tiles of 32, small enough in registers and shared memory for three CTAs per SM
// (many short prompts, where more CTAs in flight hide more of each one's latency). Key tiles are
// gathered from the listed blocks with cp.async (all threads) into shared memory in the layout
// wgmma reads without a copy: each 64-element half of a row is a 128-byte line, lines
// XOR-swizzled in 1024-byte atoms (the hardware's 128-byte swizzle), so Q and K are K-major
// operands and V an MN-major one (transposed by the instruction). Per key tile j, a warpgroup:
//   1. issues S = Q K_j^T (m64nBN, both operands in shared memory) and, behind it,
//      O += P_{j-1} V_{j-1} (m64nD, P from registers) for the previous tile;
//   2. waits for S only, and runs the masking and the online softmax of tile j on the CUDA cores
//      while the tensor cores still work on P_{j-1} V_{j-1};
//   3. waits for that product, then rescales O to tile j's running max.
// The product of the last tile is issued after the loop. K tiles are double-buffered and V
// tiles triple-buffered (V_j is read one tile later than K_j); the tile after the current one is
// gathered while it runs, behind one barrier per tile. Every warpgroup computes every key tile
// of its CTA (no wgmma is issued under a branch, which would serialize them).
//
// Writes by ordinary stores and cp.async reach wgmma (the async proxy) only after
// `fence.proxy.async`; every thread fences its own writes before the barrier that publishes them.

#define PW_KSTAGES 2
#define PW_VSTAGES 3
#define PW_INFO 3  // slot tables in flight: the tile computed, the one gathered, the next
#define PW_PREFETCH_KEYS 2048  // keys a CTA attends at most for it to prefetch the next Q

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The accumulators' operands (32 at a time) and the register lists that name them.
#define PW_D8(o)                                                                                   \
    "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]),                                    \
        "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]), "+f"(d[o + 7])
#define PW_D16(o) PW_D8(o), PW_D8(o + 8)
#define PW_D32(o) PW_D16(o), PW_D16(o + 16)
#define PW_R16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define PW_R32                                                                                     \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define PW_R64                                                                                     \
    PW_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// The wgmma shapes used, as macros over the operand type's PTX name: S = Q K^T with both operands
// in shared memory (m64n128 or m64n64 for key tiles of 128 or 64), and O += P V with P in
// registers (m64n128 for head_dim 128, m64n64 for 64). `acc` 0 overwrites d. V is MN-major: the
// last immediate transposes it.
#define PW_SS_N128(TY)                                                                             \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" PW_R64                       \
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                         \
        : PW_D32(0), PW_D32(32)                                                                    \
        : "l"(da), "l"(db), "r"(acc));

#define PW_SS_N64(TY)                                                                              \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" PW_R32                        \
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                         \
        : PW_D32(0)                                                                                \
        : "l"(da), "l"(db), "r"(acc));

#define PW_SS_N32(TY)                                                                              \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {" PW_R16                        \
        "}, %16, %17, p, 1, 1, 0, 0;\n}\n"                                                         \
        : PW_D16(0)                                                                                \
        : "l"(da), "l"(db), "r"(acc));

#define PW_RS_N128(TY)                                                                             \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" PW_R64                       \
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                           \
        : PW_D32(0), PW_D32(32)                                                                    \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));

#define PW_RS_N64(TY)                                                                              \
    asm volatile(                                                                                  \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                               \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" PW_R32                        \
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                           \
        : PW_D32(0)                                                                                \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc));

#define PW_SHAPES(T, TY)                                                                      \
    __device__ __forceinline__ void pw_ss(float* d, u64 da, u64 db, u32 acc, const T*,        \
                                          int (*)[128]) {                                     \
        PW_SS_N128(TY)                                                                        \
    }                                                                                         \
    __device__ __forceinline__ void pw_ss(float* d, u64 da, u64 db, u32 acc, const T*,        \
                                          int (*)[64]) {                                      \
        PW_SS_N64(TY)                                                                         \
    }                                                                                         \
    __device__ __forceinline__ void pw_ss(float* d, u64 da, u64 db, u32 acc, const T*,        \
                                          int (*)[32]) {                                      \
        PW_SS_N32(TY)                                                                         \
    }                                                                                         \
    __device__ __forceinline__ void pw_rs(float* d, const u32* a, u64 db, u32 acc, const T*,  \
                                          int (*)[128]) {                                     \
        PW_RS_N128(TY)                                                                        \
    }                                                                                         \
    __device__ __forceinline__ void pw_rs(float* d, const u32* a, u64 db, u32 acc, const T*,  \
                                          int (*)[64]) {                                      \
        PW_RS_N64(TY)                                                                         \
    }
PW_SHAPES(f16, "f16")
PW_SHAPES(bf16, "bf16")

// A shared-memory operand descriptor: start address, leading and stride byte offsets, 128-byte
// swizzle.
__device__ __forceinline__ u64 pw_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3ffffu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) |
           (1ull << 62);
}
__device__ __forceinline__ void pw_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void pw_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void pw_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void pw_proxy_fence() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving a register's reads or writes across this point: a wgmma in
// flight reads and writes its registers behind the compiler's back until its wait.
__device__ __forceinline__ void pw_pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void pw_pin(u32& x) { asm volatile("" : "+r"(x)::"memory"); }

// Byte offset of 16-byte chunk `ch` of row `r` in a tile of R rows stored as [D / 64][R][128 B].
template <int R>
__device__ __forceinline__ u32 pw_swz(u32 r, u32 ch) {
    return (ch >> 3) * (R * 128u) + r * 128u + (((ch & 7u) ^ (r & 7u)) << 4);
}

// The max (MAX) or the sum of t[0 .. 2 W), pairwise (short dependency chains), one level per
// instantiation so that every index is a constant and t stays in registers.
template <bool MAX, int W>
struct PwTree {
    static __device__ __forceinline__ float run(float* t) {
#pragma unroll
        for (int n = 0; n < W; n++) t[n] = MAX ? fmaxf(t[n], t[n + W]) : t[n] + t[n + W];
        return PwTree<MAX, W / 2>::run(t);
    }
};
template <bool MAX>
struct PwTree<MAX, 0> {
    static __device__ __forceinline__ float run(float* t) { return t[0]; }
};
template <bool MAX, int N>
__device__ __forceinline__ float pw_tree(float* t) {
    static_assert((N & (N - 1)) == 0, "a power of two");
    return PwTree<MAX, N / 2>::run(t);
}

// WGS warpgroups of 64 query rows; key tiles of BN slots; RES CTAs resident per SM (1: the
// next CTA's Q is prefetched).
template <typename T, int D, int WGS, int BN, int RES>
__device__ __forceinline__ void prefill_wgmma(
    float* __restrict__ out_o, float* __restrict__ out_lse, const float* __restrict__ q,
    const T* __restrict__ pool, const u32* __restrict__ tiles, const u32* __restrict__ row_pos,
    const u32* __restrict__ blk_ids, const u32* __restrict__ blk_starts,
    const u32* __restrict__ seq_first, const u32* __restrict__ seq_tokens, u32 n_heads,
    u32 kv_heads, u32 bt, float scale_log2) {
    constexpr int BM = 64 * WGS, THREADS = 128 * WGS;
    static_assert(THREADS >= BN, "one thread per key slot for the slot tables");
    constexpr int CPR = D / 8;         // 16-byte chunks per row
    constexpr int KSTEPS = D / 16;     // k-steps of S = Q K^T
    constexpr int PSTEPS = BN / 16; // k-steps of O += P V
    constexpr int SN = BN / 2;      // S accumulators per thread
    constexpr int ON = D / 2;          // O accumulators per thread
    constexpr u32 Q_BYTES = BM * D * 2;
    constexpr u32 KV_BYTES = BN * D * 2;
    extern __shared__ __align__(128) unsigned char pw_smem[];
    // From the first 1024-byte boundary (swizzle atoms are aligned): Q | K x2 | V x3 | krow u32
    // [PW_INFO][BN] | kpos u32 [PW_INFO][BN] (krow and kpos as in prefill.cu).
    const u32 raw = pf_smem_addr(pw_smem);
    const u32 base = (raw + 1023u) & ~1023u;
    unsigned char* const smem = pw_smem + (base - raw);
    const u32 q_base = base, k_base = base + Q_BYTES;
    const u32 v_base = k_base + PW_KSTAGES * KV_BYTES;
    u32* s_krow = reinterpret_cast<u32*>(smem + Q_BYTES + (PW_KSTAGES + PW_VSTAGES) * KV_BYTES);
    u32* s_kpos = s_krow + PW_INFO * BN;

    const u32 tid = threadIdx.x, lane = tid & 31u, wg = tid >> 7, wi = (tid >> 5) & 3u;
    const u32 g = lane >> 2, t4 = lane & 3u;
    const u32 h = blockIdx.x % n_heads, tile = blockIdx.x / n_heads;
    const uint4 td = reinterpret_cast<const uint4*>(tiles)[2 * (u64)tile];
    const u32 row0 = td.x, nrows = td.y, b = td.z;
    const u32 max_pos = tiles[8 * (u64)tile + 4];
    const u32 kvh = h / (n_heads / kv_heads);
    // With one CTA per SM, nothing hides a CTA's first loads: the Q rows of the CTA that starts
    // about when this one ends (a wave later: %nsmid SMs on) are asked into L2 during this
    // CTA's last key tile, so that its loads find them there instead of waiting on DRAM (a
    // guess that costs only bandwidth when wrong). Only for CTAs of at most PW_PREFETCH_KEYS
    // keys: longer ones end too unevenly for the guess (on an H100 the prefetch took 32 x 1K
    // from 265 to 277 TFLOP/s and cost 4 x 8K 4%).
    u32 next_row0 = 0, next_rows = 0, next = 0;
    if (RES == 1) {
        u32 nsm;
        asm("mov.u32 %0, %%nsmid;" : "=r"(nsm));
        next = blockIdx.x + nsm;
        if (next < gridDim.x) {
            const uint2 nt = reinterpret_cast<const uint2*>(tiles)[4 * (u64)(next / n_heads)];
            next_row0 = nt.x;
            next_rows = nt.y;
        }
    }
    const float* next_q = q + (u64)(next % n_heads) * D;

    // Q first (f32; rows past the tile are zero), so that it is in flight during the dependent
    // loads below.
    constexpr int Q4 = BM * (D / 4) / THREADS;  // float4 of Q per thread
    const u64 q_stride = (u64)n_heads * D;
    float4 qx[Q4];
#pragma unroll
    for (int i = 0; i < Q4; i++)
        qx[i] = pf_load_q4<D>(q, tid + i * THREADS, row0, nrows, q_stride, h);
    // This thread's rows: wr + 16 wi + g and + 8 (rows past the tile take its last position).
    const u32 wr = wg * 64;
    const u32 last_row = nrows - 1;
    const u32 pos0 = row_pos[row0 + min(wr + 16 * wi + g, last_row)];
    const u32 pos1 = row_pos[row0 + min(wr + 16 * wi + g + 8, last_row)];
    const u32 warp_min = row_pos[row0 + min(wr + 16 * wi, last_row)];

    const PfTileKeys keys = pf_tile_keys(tid, BN, b, max_pos, seq_first, seq_tokens, blk_starts,
                                         blk_ids, bt, kv_heads, kvh);
    const u32 first = keys.first, n_slots = keys.n_slots;
    // Broadcast from lane 0: the compiler then knows that the loop's branches do not diverge
    // inside a warp, and keeps wgmma asynchronous across them.
    const u32 n_ktiles = __shfl_sync(0xffffffffu, (n_slots + BN - 1) / BN, 0);
    const u32 v_rows = kv_heads * bt;

    auto slot_info = [&](u32 kt) {
        const u32 buf = kt % PW_INFO;
        if (tid < BN)
            pf_slot(kt * BN + tid, n_slots, blk_starts, blk_ids, first, bt, kv_heads, kvh,
                    s_kpos[buf * BN + tid], s_krow[buf * BN + tid]);
    };
    // K and V of key tile `kt` into their stages; each thread copies chunk `tid % CPR` of rows
    // tid / CPR + i * THREADS / CPR.
    const T* pool_ch = pool + (tid % CPR) * 8;
    constexpr int LOADS = BN * CPR / THREADS;
    auto load_kv = [&](u32 kt) {
        const u32 buf = kt % PW_INFO;
        const u32 kdst = k_base + (kt % PW_KSTAGES) * KV_BYTES;
        const u32 vdst = v_base + (kt % PW_VSTAGES) * KV_BYTES;
        u32 krow[LOADS];
#pragma unroll
        for (int i = 0; i < LOADS; i++)
            krow[i] = s_krow[buf * BN + (tid + i * THREADS) / CPR];
#pragma unroll
        for (int i = 0; i < LOADS; i++) {
            const u32 c = tid + i * THREADS;
            const u32 off = pw_swz<BN>(c / CPR, c % CPR);
            const bool valid = krow[i] != PF_NONE;
            const T* src = pool_ch + (u64)(valid ? krow[i] : 0u) * D;
            pf_cp_async16(kdst + off, src, valid ? 16u : 0u);
            pf_cp_async16(vdst + off, src + (u64)v_rows * D, valid ? 16u : 0u);
        }
        pf_cp_commit();
    };

    static_assert(PW_INFO >= 2, "key tiles 0 and 1 take slot buffers 0 and 1");
    if (tid < BN) pf_first_slots_store(keys.slots, tid, BN, n_slots, s_kpos, s_krow);
    __syncthreads();
    if (n_ktiles > 0) load_kv(0);
    // Q, scaled and rounded to T (zero rows stay zero).
#pragma unroll
    for (int i = 0; i < Q4; i++) {
        const u32 c = tid + i * THREADS, c4 = c % (D / 4);
        *reinterpret_cast<uint2*>(smem + pw_swz<BM>(c / (D / 4), c4 >> 1) + (c4 & 1u) * 8) =
            pf_pack_q4(qx[i], scale_log2, pool);
    }

    // Accumulator layout (per warp, as mma.sync's m16n8): element 4 n + e of S or O is row
    // g + 8 (e >> 1), column 8 n + 2 t4 + (e & 1) of the warp's 16 rows.
    float o[ON];
#pragma unroll
    for (int i = 0; i < ON; i++) o[i] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    u32 p_prev[PSTEPS][4];
    const u32 q_wg = q_base + wr * 128u;

    // O += P_{j-1} V_{j-1}, from registers and V's stage.
    auto issue_pv = [&](u32 j) {
        const u32 vb = v_base + ((j - 1) % PW_VSTAGES) * KV_BYTES;
#pragma unroll
        for (int ks = 0; ks < PSTEPS; ks++)
            pw_rs(o, p_prev[ks], pw_desc(vb + ks * 16 * 128u, BN * 128u, 1024), 1, pool,
                  (int (*)[D])0);
    };
    // Key tile j; `pv`: whether a previous tile's product is due (false only for tile 0, a
    // constant in each call, so that no wgmma is issued under a branch).
    auto step = [&](u32 j, bool pv) {
        asm volatile("cp.async.wait_group 0;" ::: "memory");  // tile j has landed
        pw_proxy_fence();
        __syncthreads();
        if (j + 1 < n_ktiles) load_kv(j + 1);
        if (j + 2 < n_ktiles) slot_info(j + 2);
        if (RES == 1 && j + 1 == n_ktiles && n_ktiles * BN <= PW_PREFETCH_KEYS) {
            constexpr u32 LINES = D * 4 / 128;  // 128-byte lines of an f32 Q row
            for (u32 i = tid; i < next_rows * LINES; i += THREADS)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(
                    next_q + (u64)(next_row0 + i / LINES) * q_stride + (i % LINES) * 32));
        }

        // Every warpgroup computes every key tile: with prompts aligned to 128 tokens every key
        // tile of a query tile reaches both of its halves, and a skipped tile would put wgmma
        // under a branch. Keys after a row are masked.
        float s[SN];
        u32 p_cur[PSTEPS][4];
        const u32 kb = k_base + (j % PW_KSTAGES) * KV_BYTES;
        pw_fence();
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) {
            const u32 off = (kk >> 2) * (BN * 128u) + (kk & 3) * 32u;
            const u64 da = pw_desc(q_wg + (kk >> 2) * (BM * 128u) + (kk & 3) * 32u, 16, 1024);
            pw_ss(s, da, pw_desc(kb + off, 16, 1024), kk > 0, pool, (int (*)[BN])0);
        }
        pw_commit();
        if (pv) issue_pv(j);
        pw_commit();
        pw_wait<1>();  // S
#pragma unroll
        for (int i = 0; i < SN; i++) pw_pin(s[i]);

        const u32 info = (j % PW_INFO) * BN;
        if (s_kpos[info + BN - 1] > warp_min) {  // some key of the tile is after some row
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
                const uint2 kp = *reinterpret_cast<const uint2*>(s_kpos + info + n * 8 + 2 * t4);
                if (kp.x > pos0) s[4 * n] = NEG_INF;
                if (kp.y > pos0) s[4 * n + 1] = NEG_INF;
                if (kp.x > pos1) s[4 * n + 2] = NEG_INF;
                if (kp.y > pos1) s[4 * n + 3] = NEG_INF;
            }
        }
        float corr[2];
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {  // rows g (hf 0) and g + 8 (hf 1)
            float& m = hf ? m1 : m0;
            float& l = hf ? l1 : l0;
            float t[BN / 8];
#pragma unroll
            for (int n = 0; n < BN / 8; n++) t[n] = fmaxf(s[4 * n + 2 * hf], s[4 * n + 2 * hf + 1]);
            float mx = fmaxf(pw_tree<true, BN / 8>(t), m);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row that has seen nothing yet keeps max -inf: subtract 0 so that exp2 gives 0,
            // not NaN.
            const float base_m = mx == NEG_INF ? 0.0f : mx;
            corr[hf] = pf_exp2(m - base_m);
            m = mx;
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
                s[4 * n + 2 * hf] = pf_exp2(s[4 * n + 2 * hf] - base_m);
                s[4 * n + 2 * hf + 1] = pf_exp2(s[4 * n + 2 * hf + 1] - base_m);
                t[n] = s[4 * n + 2 * hf] + s[4 * n + 2 * hf + 1];
            }
            l = l * corr[hf] + pw_tree<false, BN / 8>(t);
        }
#pragma unroll
        for (int ks = 0; ks < PSTEPS; ks++) {
            p_cur[ks][0] = pf_pack(s[8 * ks], s[8 * ks + 1], pool);
            p_cur[ks][1] = pf_pack(s[8 * ks + 2], s[8 * ks + 3], pool);
            p_cur[ks][2] = pf_pack(s[8 * ks + 4], s[8 * ks + 5], pool);
            p_cur[ks][3] = pf_pack(s[8 * ks + 6], s[8 * ks + 7], pool);
        }

        pw_wait<0>();  // P_{j-1} V_{j-1}
#pragma unroll
        for (int i = 0; i < ON; i++) pw_pin(o[i]);
#pragma unroll
        for (int ks = 0; ks < PSTEPS; ks++)
#pragma unroll
            for (int e = 0; e < 4; e++) pw_pin(p_prev[ks][e]);
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            o[4 * n] *= corr[0];
            o[4 * n + 1] *= corr[0];
            o[4 * n + 2] *= corr[1];
            o[4 * n + 3] *= corr[1];
        }
#pragma unroll
        for (int ks = 0; ks < PSTEPS; ks++)
#pragma unroll
            for (int e = 0; e < 4; e++) p_prev[ks][e] = p_cur[ks][e];
    };

    if (n_ktiles > 0) {
        step(0, false);
        for (u32 j = 1; j < n_ktiles; j++) step(j, true);
        pw_fence();
        issue_pv(n_ktiles);
        pw_commit();
        pw_wait<0>();
#pragma unroll
        for (int i = 0; i < ON; i++) pw_pin(o[i]);
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");

#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const u32 r = wr + 16 * wi + 8 * hf + g;
        const auto pair = [&](int n) { return make_float2(o[4 * n + 2 * hf], o[4 * n + 2 * hf + 1]); };
        pf_store_row<D>(out_o, out_lse, (u64)row0 + r, r < nrows, q_stride, n_heads, h, t4,
                        hf ? l1 : l0, hf ? m1 : m0, pair);
    }
}

#define PW_BODY(T, D, WGS, BN, RES) prefill_wgmma<T, D, WGS, BN, RES>(PF_TC_ARGS);
#else
// Not compiled for sm_90a: the host never launches these (see prefill.rs).
#define PW_BODY(T, D, WGS, BN, RES) __trap();
#endif

// MINB: CTAs per SM that the registers must allow (wgmma64 is meant to run two to an SM,
// wgmma64k32 three).
#define PW_KERNEL(NAME, T, D, WGS, BN, MINB)                                                \
    extern "C" __global__ void __launch_bounds__(128 * WGS, MINB) NAME(PF_TC_PARAMS(T)) { \
        PW_BODY(T, D, WGS, BN, MINB)                                                        \
    }

PW_KERNEL(prefill_wgmma128_f16_d64, f16, 64, 2, 128, 1)
PW_KERNEL(prefill_wgmma128_f16_d128, f16, 128, 2, 128, 1)
PW_KERNEL(prefill_wgmma128_bf16_d64, bf16, 64, 2, 128, 1)
PW_KERNEL(prefill_wgmma128_bf16_d128, bf16, 128, 2, 128, 1)
PW_KERNEL(prefill_wgmma64_f16_d64, f16, 64, 1, 64, 2)
PW_KERNEL(prefill_wgmma64_f16_d128, f16, 128, 1, 64, 2)
PW_KERNEL(prefill_wgmma64_bf16_d64, bf16, 64, 1, 64, 2)
PW_KERNEL(prefill_wgmma64_bf16_d128, bf16, 128, 1, 64, 2)
PW_KERNEL(prefill_wgmma64k32_f16_d64, f16, 64, 1, 32, 3)
PW_KERNEL(prefill_wgmma64k32_f16_d128, f16, 128, 1, 32, 3)
PW_KERNEL(prefill_wgmma64k32_bf16_d64, bf16, 64, 1, 32, 3)
PW_KERNEL(prefill_wgmma64k32_bf16_d128, bf16, 128, 1, 32, 3)
