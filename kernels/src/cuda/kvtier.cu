// The GPU KV tier's data movement: appending rows' K and V into pool blocks, exporting blocks
// for a spill to host memory (gathered as stored, or widened to f32), reading hidden states
// straight from mapped host memory, and the argmax of logits rows.

__device__ __forceinline__ void store_rn(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_rn(f16* p, float x) { *p = from_f32<f16>(x); }
__device__ __forceinline__ void store_rn(bf16* p, float x) { *p = from_f32<bf16>(x); }

// k, v: [rows, kv_heads * head_dim] f32; slots[r] = block * bt + offset of row r's token.
// Pool blocks are [2 (K, V), kv_heads, bt, head_dim]; values are rounded to nearest even.
template <typename T>
__device__ void kv_append(T* pool, const float* k, const float* v, const u32* slots, u64 rows,
                          u32 kv_heads, u32 head_dim, u32 bt) {
    const u64 width = (u64)kv_heads * head_dim;
    const u64 half = width * bt;
    const u64 n = rows * width;
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const u64 r = i / width, c = i - r * width;
        const u32 h = (u32)(c / head_dim), d = (u32)(c - (u64)h * head_dim);
        const u32 slot = slots[r];
        const u64 block = slot / bt, t = slot - block * bt;
        const u64 at = block * 2 * half + ((u64)h * bt + t) * head_dim + d;
        store_rn(pool + at, k[i]);
        store_rn(pool + at + half, v[i]);
    }
}

extern "C" __global__ void kv_append_f32(float* pool, const float* k, const float* v, const u32* slots, u64 rows, u32 kv_heads, u32 head_dim, u32 bt) {
    kv_append(pool, k, v, slots, rows, kv_heads, head_dim, bt);
}
extern "C" __global__ void kv_append_f16(f16* pool, const float* k, const float* v, const u32* slots, u64 rows, u32 kv_heads, u32 head_dim, u32 bt) {
    kv_append(pool, k, v, slots, rows, kv_heads, head_dim, bt);
}
extern "C" __global__ void kv_append_bf16(bf16* pool, const float* k, const float* v, const u32* slots, u64 rows, u32 kv_heads, u32 head_dim, u32 bt) {
    kv_append(pool, k, v, slots, rows, kv_heads, head_dim, bt);
}

// out: [rows, width] f32, row r read from device address rows[r]: hidden states in page-locked
// host slots mapped for the device, read by the SMs over PCIe (no copy engine, no staging), so
// a recompute reads exactly its rows' bytes. vec4: every row 16-byte aligned and width a
// multiple of 4, read 16 bytes a load (four times the reads in flight over PCIe).
extern "C" __global__ void gather_rows_f32(float* out, const u64* rows_at, u64 rows, u64 width, u32 vec4) {
    if (vec4) {
        const u64 w4 = width / 4, n = rows * w4;
        float4* o = reinterpret_cast<float4*>(out);
        for (u64 i = global_thread(); i < n; i += grid_threads()) {
            const u64 r = i / w4, c = i - r * w4;
            o[i] = reinterpret_cast<const float4*>(rows_at[r])[c];
        }
        return;
    }
    const u64 n = rows * width;
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const u64 r = i / width, c = i - r * width;
        out[i] = reinterpret_cast<const float*>(rows_at[r])[c];
    }
}

// out: [n_ids, block_elems] f32 = widen(pool[ids[i]]).
template <typename T>
__device__ void kv_export(float* out, const T* pool, const u32* ids, u64 n_ids, u64 block_elems) {
    const u64 n = n_ids * block_elems;
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const u64 b = i / block_elems, e = i - b * block_elems;
        out[i] = to_f32(pool[(u64)ids[b] * block_elems + e]);
    }
}

extern "C" __global__ void kv_export_f32(float* out, const float* pool, const u32* ids, u64 n_ids, u64 block_elems) {
    kv_export(out, pool, ids, n_ids, block_elems);
}
extern "C" __global__ void kv_export_f16(float* out, const f16* pool, const u32* ids, u64 n_ids, u64 block_elems) {
    kv_export(out, pool, ids, n_ids, block_elems);
}
extern "C" __global__ void kv_export_bf16(float* out, const bf16* pool, const u32* ids, u64 n_ids, u64 block_elems) {
    kv_export(out, pool, ids, n_ids, block_elems);
}

// out: [n_ids, block_elems] = pool[ids[i]], 16-bit values (f16 or bf16) copied as they are: a
// spill to a host tier of the pool's dtype moves the pool's bytes, never widened.
extern "C" __global__ void kv_gather_u16(unsigned short* out, const unsigned short* pool, const u32* ids, u64 n_ids, u64 block_elems) {
    const u64 n = n_ids * block_elems;
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const u64 b = i / block_elems, e = i - b * block_elems;
        out[i] = pool[(u64)ids[b] * block_elems + e];
    }
}

// (v, i) beats (w, j): a value beats no value (index 0xffffffff), then the larger value, then,
// on ties, the lower index, so the combined pick is the first largest whatever the partition.
__device__ __forceinline__ bool argmax_beats(float v, u32 i, float w, u32 j) {
    return i != 0xffffffffu && (j == 0xffffffffu || v > w || (v == w && i < j));
}

// Folds each lane's (best, at) into lane 0's: the warp's pick.
__device__ __forceinline__ void warp_argmax(float& best, u32& at) {
    for (u32 o = 16; o > 0; o >>= 1) {
        const float v = __shfl_down_sync(0xffffffffu, best, o);
        const u32 i = __shfl_down_sync(0xffffffffu, at, o);
        if (argmax_beats(v, i, best, at)) {
            best = v;
            at = i;
        }
    }
}

// out[r] = the first index of the largest value of row r of x: [rows, cols] (NaN never wins,
// like the CPU sampler's greedy pick). One block of ARGMAX_THREADS per row: a row is a whole
// vocabulary (128K values for Llama 3), so each thread keeps ARGMAX_UNROLL loads in flight
// rather than waiting on one at a time.
#define ARGMAX_THREADS 1024
#define ARGMAX_UNROLL 8
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_rows(u32* out, const float* x,
                                                                         u64 cols) {
    __shared__ float s_v[32];
    __shared__ u32 s_i[32];
    const float* row = x + (u64)blockIdx.x * cols;
    float best = NEG_INF;
    u32 at = 0xffffffffu;
    const u64 step = (u64)blockDim.x * ARGMAX_UNROLL;
    for (u64 c0 = threadIdx.x; c0 < cols; c0 += step) {
        float v[ARGMAX_UNROLL];
#pragma unroll
        for (u32 r = 0; r < ARGMAX_UNROLL; ++r) {
            const u64 c = c0 + (u64)r * blockDim.x;
            v[r] = c < cols ? row[c] : 0.0f;
        }
#pragma unroll
        for (u32 r = 0; r < ARGMAX_UNROLL; ++r) {
            const u64 c = c0 + (u64)r * blockDim.x;
            if (c < cols && (v[r] > best || (at == 0xffffffffu && v[r] == v[r]))) {
                best = v[r];
                at = (u32)c;
            }
        }
    }
    warp_argmax(best, at);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_v[warp] = best;
        s_i[warp] = at;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < (blockDim.x >> 5) ? s_v[lane] : NEG_INF;
        at = lane < (blockDim.x >> 5) ? s_i[lane] : 0xffffffffu;
        warp_argmax(best, at);
        if (lane == 0) out[blockIdx.x] = at == 0xffffffffu ? 0u : at;
    }
}
