// out[m, n] = x[m, k] . w[n, k]^T for a few rows (m <= GEMV_MAX_ROWS): decode-time linear layers
// over f16/bf16 weights, with the activation kept in f32 and f32 accumulation, the math of the CPU
// backend (each weight widened to f32, multiplied by the f32 activation, the product rounded and
// then added: the program is compiled with --fmad=false). Only the order of the additions
// differs: each lane sums each 8-element chunk as a tree, then its chunks in order, then the
// lanes of a warp (butterfly) and the k-slices of a column (in slice order). Deterministic: the
// same launch gives the same bits.
//
// Memory-bound: every weight byte is read once, for all m rows together.
// - Block: GEMV_THREADS threads as blockDim (32, S, G): G column groups of C adjacent columns
//   each, every group's k range split into S slices, one warp per (group, slice). The host picks
//   S (more slices for narrow n, so that enough loads are in flight); correctness holds for any
//   blockDim (32, S, G) with S * G <= GEMV_WARPS and any grid (blocks stride over column tiles).
// - Vector path (k % 8 == 0, w and x 16-byte aligned): lane l of slice s reads the 16-byte
//   chunks (8 weights) s * 32 + l, + 32 S, ..., U chunks per column per step, all C * U loads
//   issued before any is used; weights bypass L1 (read once), x is read through L1 as float4
//   (every warp of the SM reads the same x), each x load serving C columns.
// - Scalar path (any other k or alignment): the same layout with single elements.
// - The warp sums its m * C partial sums; with S > 1 the slices meet in shared memory and the
//   first slice adds them in order.
// - Rows are compile-time: one instantiation per m (1..8), each with its own C and U. That is
//   about 1 MB of PTX, 3 s of NVRTC and 3.5 s of PTX JIT on an H100 at a cold start (the old
//   one-warp-per-column kernel: 0.2 s).
#define GEMV_MAX_ROWS 8
#define GEMV_WARPS 8
#define GEMV_THREADS (GEMV_WARPS * 32)

// Columns per warp for m rows (`cols_per_warp` in kernels.rs's `gemv`): x costs 2 * m / C bytes
// of L1 traffic per weight byte, so wider m shares each x load among more columns.
__host__ __device__ constexpr u32 gemv_cols(u32 m) {
    return m <= 2 ? 1u : (m <= 4 ? 2u : 4u);
}
// 16-byte weight chunks per column a lane loads per step: C * U = 8 loads (128 B) in flight.
__host__ __device__ constexpr u32 gemv_unroll(u32 m) { return 8u / gemv_cols(m); }

// 16 bytes of weights, not kept in L1.
__device__ __forceinline__ void gemv_load_w(u32 (&v)[4], const void* p) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                 : "l"(p));
}

// 4 activations through L1 (read-only for the kernel's lifetime).
__device__ __forceinline__ void gemv_load_x(float* v, const float* p) {
    asm volatile("ld.global.nc.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
                 : "l"(p));
}

// The 8 weights of a chunk, widened (element 2q is the low half of word q).
__device__ __forceinline__ void gemv_widen(const u32 (&v)[4], float (&f)[8], const f16*) {
#pragma unroll
    for (u32 q = 0; q < 4; q++) {
        f16 lo, hi;
        lo.bits = (unsigned short)(v[q] & 0xffffu);
        hi.bits = (unsigned short)(v[q] >> 16);
        f[2 * q] = to_f32(lo);
        f[2 * q + 1] = to_f32(hi);
    }
}

__device__ __forceinline__ void gemv_widen(const u32 (&v)[4], float (&f)[8], const bf16*) {
#pragma unroll
    for (u32 q = 0; q < 4; q++) {
        f[2 * q] = __uint_as_float(v[q] << 16);
        f[2 * q + 1] = __uint_as_float(v[q] & 0xffff0000u);
    }
}

// acc[i][c] += x[i, 8 ch .. 8 ch + 8] . wv[c] for every row i and column c of the group.
template <typename T, u32 M, u32 C>
__device__ __forceinline__ void gemv_chunk(float (&acc)[M][C], const float* x, u64 k, u32 ch,
                                           const u32 (&wv)[C][4]) {
    float wf[C][8];
#pragma unroll
    for (u32 c = 0; c < C; c++) gemv_widen(wv[c], wf[c], (const T*)0);
#pragma unroll
    for (u32 i = 0; i < M; i++) {
        float xv[8];
        const float* xp = x + i * k + (u64)ch * 8;
        gemv_load_x(xv, xp);
        gemv_load_x(xv + 4, xp + 4);
#pragma unroll
        for (u32 c = 0; c < C; c++) {
            float p[8];
#pragma unroll
            for (u32 e = 0; e < 8; e++) p[e] = xv[e] * wf[c][e];
            acc[i][c] += ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
        }
    }
}

// The vector path: chunks first, first + stride, ... of the C rows `wr`.
template <typename T, u32 M, u32 C, u32 U>
__device__ __forceinline__ void gemv_dot_vec(float (&acc)[M][C], const float* x,
                                             const T* const (&wr)[C], u64 k, u32 first,
                                             u32 stride) {
    const u32 chunks = (u32)(k >> 3);
    u32 ch = first;
    for (; ch + (U - 1) * stride < chunks; ch += U * stride) {
        u32 wv[U][C][4];
#pragma unroll
        for (u32 u = 0; u < U; u++)
#pragma unroll
            for (u32 c = 0; c < C; c++)
                gemv_load_w(wv[u][c], wr[c] + (u64)(ch + u * stride) * 8);
#pragma unroll
        for (u32 u = 0; u < U; u++) gemv_chunk<T, M, C>(acc, x, k, ch + u * stride, wv[u]);
    }
    for (; ch < chunks; ch += stride) {
        u32 wv[C][4];
#pragma unroll
        for (u32 c = 0; c < C; c++) gemv_load_w(wv[c], wr[c] + (u64)ch * 8);
        gemv_chunk<T, M, C>(acc, x, k, ch, wv);
    }
}

// The scalar path: elements first, first + stride, ... (any k, any alignment).
template <typename T, u32 M, u32 C>
__device__ __forceinline__ void gemv_dot_scalar(float (&acc)[M][C], const float* x,
                                                const T* const (&wr)[C], u64 k, u32 first,
                                                u32 stride) {
    for (u64 p = first; p < k; p += stride) {
        float wf[C];
#pragma unroll
        for (u32 c = 0; c < C; c++) wf[c] = to_f32(wr[c][p]);
#pragma unroll
        for (u32 i = 0; i < M; i++) {
            const float xv = x[i * k + p];
#pragma unroll
            for (u32 c = 0; c < C; c++) acc[i][c] += xv * wf[c];
        }
    }
}

// One launch for m = M rows. `partial` holds GEMV_WARPS * 32 floats of shared memory.
template <typename T, u32 M, u32 C, u32 U>
__device__ void gemv_rows(float* out, const float* x, const T* w, u64 k, u64 n, bool vec,
                          float* partial) {
    static_assert(M * C <= 32, "one lane per (row, column) result");
    const u32 lane = threadIdx.x, slice = threadIdx.y, slices = blockDim.y;
    const u32 warp = threadIdx.z * slices + slice;
    const u64 cols_per_block = (u64)blockDim.z * C;
    const u64 tiles = (n + cols_per_block - 1) / cols_per_block;
    for (u64 t = blockIdx.x; t < tiles; t += gridDim.x) {
        const u64 j0 = t * cols_per_block + (u64)threadIdx.z * C;
        // Columns past n read the last row again and write nothing.
        const T* wr[C];
#pragma unroll
        for (u32 c = 0; c < C; c++) wr[c] = w + (j0 + c < n ? j0 + c : n - 1) * k;
        float acc[M][C];
#pragma unroll
        for (u32 i = 0; i < M; i++)
#pragma unroll
            for (u32 c = 0; c < C; c++) acc[i][c] = 0.0f;
        if (vec)
            gemv_dot_vec<T, M, C, U>(acc, x, wr, k, slice * 32 + lane, slices * 32);
        else
            gemv_dot_scalar<T, M, C>(acc, x, wr, k, slice * 32 + lane, slices * 32);
        // Lane i * C + c keeps the warp's sum for row i, column j0 + c.
        float mine = 0.0f;
#pragma unroll
        for (u32 i = 0; i < M; i++)
#pragma unroll
            for (u32 c = 0; c < C; c++) {
                const float s = warp_sum(acc[i][c]);
                if (lane == i * C + c) mine = s;
            }
        if (slices > 1) {
            partial[warp * 32 + lane] = mine;
            __syncthreads();
            if (slice == 0) {
                for (u32 s = 1; s < slices; s++) mine += partial[(warp + s) * 32 + lane];
            }
            __syncthreads();
        }
        const u64 j = j0 + lane % C;
        if (slice == 0 && lane < M * C && j < n) out[(lane / C) * n + j] = mine;
    }
}

template <typename T, u32 M>
__device__ __forceinline__ void gemv_m(float* out, const float* x, const T* w, u64 k, u64 n,
                                       bool vec, float* partial) {
    gemv_rows<T, M, gemv_cols(M), gemv_unroll(M)>(out, x, w, k, n, vec, partial);
}

template <typename T>
__device__ void gemv(float* out, const float* x, const T* w, u32 m, u64 k, u64 n) {
    __shared__ float partial[GEMV_WARPS * 32];
    const bool vec = (k & 7) == 0 && (((u64)w | (u64)x) & 15) == 0;
    switch (m) {
        case 1: gemv_m<T, 1>(out, x, w, k, n, vec, partial); break;
        case 2: gemv_m<T, 2>(out, x, w, k, n, vec, partial); break;
        case 3: gemv_m<T, 3>(out, x, w, k, n, vec, partial); break;
        case 4: gemv_m<T, 4>(out, x, w, k, n, vec, partial); break;
        case 5: gemv_m<T, 5>(out, x, w, k, n, vec, partial); break;
        case 6: gemv_m<T, 6>(out, x, w, k, n, vec, partial); break;
        case 7: gemv_m<T, 7>(out, x, w, k, n, vec, partial); break;
        case 8: gemv_m<T, 8>(out, x, w, k, n, vec, partial); break;
        default: break;
    }
}

extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
    gemv_f16(float* __restrict__ out, const float* __restrict__ x, const f16* __restrict__ w,
             u32 m, u64 k, u64 n) {
    gemv(out, x, w, m, k, n);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2)
    gemv_bf16(float* __restrict__ out, const float* __restrict__ x, const bf16* __restrict__ w,
              u32 m, u64 k, u64 n) {
    gemv(out, x, w, m, k, n);
}
