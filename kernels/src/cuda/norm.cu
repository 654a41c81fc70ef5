// Row reductions: one block of ROW_THREADS threads per row of `cols` values. Statistics are f32
// tree sums (the CPU backend sums sequentially in f32; the reference in f64).
//
// Each thread takes its columns (threadIdx.x, + blockDim.x, ...) ROW_UNROLL at a time, loading
// them all before using any: one load at a time, a 4096-wide row is 16 dependent round trips to
// memory per thread, and a decode step's norms (a few rows, so a few blocks) took 15 µs each.
// The sums still add each thread's columns in column order, as before.

#define ROW_UNROLL 8

// Column `r` of this thread's batch starting at `c0`.
__device__ __forceinline__ u64 row_col(u64 c0, u32 r) { return c0 + (u64)r * blockDim.x; }

// v[r] = p[column r of the batch at c0], 0 past the row.
__device__ __forceinline__ void row_load(float (&v)[ROW_UNROLL], const float* p, u64 c0,
                                         u64 cols) {
#pragma unroll
    for (u32 r = 0; r < ROW_UNROLL; ++r) {
        const u64 c = row_col(c0, r);
        v[r] = c < cols ? p[c] : 0.0f;
    }
}

// 1 / sqrt(mean(x^2) + eps) of this block's row.
__device__ __forceinline__ float rms_inv(const float* x, u64 base, u64 cols, float eps,
                                         float* scratch) {
    float ss = 0.0f;
    for (u64 c0 = threadIdx.x; c0 < cols; c0 += (u64)blockDim.x * ROW_UNROLL) {
        float v[ROW_UNROLL];
        row_load(v, x + base, c0, cols);
#pragma unroll
        for (u32 r = 0; r < ROW_UNROLL; ++r)
            if (row_col(c0, r) < cols) ss += v[r] * v[r];
    }
    ss = block_sum(ss, scratch);
    return 1.0f / sqrtf(ss / (float)cols + eps);
}

// Normalises this block's row, x / sqrt(mean(x^2) + eps) * w, and hands each value to
// `store(index, value)`.
template <typename Store>
__device__ __forceinline__ void rms_norm_row(const float* x, const float* w, u64 cols, float eps,
                                             Store store) {
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * cols;
    const float inv = rms_inv(x, base, cols, eps, scratch);
    for (u64 c0 = threadIdx.x; c0 < cols; c0 += (u64)blockDim.x * ROW_UNROLL) {
        float v[ROW_UNROLL], g[ROW_UNROLL];
        row_load(v, x + base, c0, cols);
        row_load(g, w, c0, cols);
#pragma unroll
        for (u32 r = 0; r < ROW_UNROLL; ++r) {
            const u64 c = row_col(c0, r);
            if (c < cols) store(base + c, v[r] * inv * g[r]);
        }
    }
}

// out = x / sqrt(mean(x^2) + eps) * w; w: [cols] f32 (vectors are widened at upload).
extern "C" __global__ void rms_norm(float* out, const float* x, const float* w, u64 cols, float eps) {
    rms_norm_row(x, w, cols, eps, [&](u64 i, float v) { out[i] = v; });
}

// rms_norm, also writing the next projections' GEMM operands (see store_with_operands).
template <typename T>
__device__ void rms_norm_ops(float* out, T* hi, T* lo, const float* x, const float* w, u64 cols,
                             float eps) {
    rms_norm_row(x, w, cols, eps,
                 [&](u64 i, float v) { store_with_operands(out, hi, lo, i, v); });
}

extern "C" __global__ void rms_norm_ops_f16(float* out, f16* hi, f16* lo, const float* x,
                                            const float* w, u64 cols, float eps) {
    rms_norm_ops(out, hi, lo, x, w, cols, eps);
}
extern "C" __global__ void rms_norm_ops_bf16(float* out, bf16* hi, bf16* lo, const float* x,
                                             const float* w, u64 cols, float eps) {
    rms_norm_ops(out, hi, lo, x, w, cols, eps);
}

// out = (x - mean) / sqrt(var + eps) * w + b, two-pass mean and variance.
extern "C" __global__ void layer_norm(float* out, const float* x, const float* w, const float* b,
                                      u64 cols, float eps) {
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * cols;
    const u64 step = (u64)blockDim.x * ROW_UNROLL;
    float s = 0.0f;
    for (u64 c0 = threadIdx.x; c0 < cols; c0 += step) {
        float v[ROW_UNROLL];
        row_load(v, x + base, c0, cols);
#pragma unroll
        for (u32 r = 0; r < ROW_UNROLL; ++r)
            if (row_col(c0, r) < cols) s += v[r];
    }
    const float mean = block_sum(s, scratch) / (float)cols;
    float var = 0.0f;
    for (u64 c0 = threadIdx.x; c0 < cols; c0 += step) {
        float v[ROW_UNROLL];
        row_load(v, x + base, c0, cols);
#pragma unroll
        for (u32 r = 0; r < ROW_UNROLL; ++r) {
            const float d = v[r] - mean;
            if (row_col(c0, r) < cols) var += d * d;
        }
    }
    const float inv = 1.0f / sqrtf(block_sum(var, scratch) / (float)cols + eps);
    for (u64 c0 = threadIdx.x; c0 < cols; c0 += step) {
        float v[ROW_UNROLL], g[ROW_UNROLL], h[ROW_UNROLL];
        row_load(v, x + base, c0, cols);
        row_load(g, w, c0, cols);
        row_load(h, b, c0, cols);
#pragma unroll
        for (u32 r = 0; r < ROW_UNROLL; ++r) {
            const u64 c = row_col(c0, r);
            if (c < cols) out[base + c] = (v[r] - mean) * inv * g[r] + h[r];
        }
    }
}

// Row-wise softmax in place: exp(x - max) / sum.
extern "C" __global__ void softmax_inplace(float* x, u64 cols) {
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * cols;
    float m = NEG_INF;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, x[base + c]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float e = expf(x[base + c] - m);
        x[base + c] = e;
        s += e;
    }
    s = block_sum(s, scratch);
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) x[base + c] /= s;
}
