// Row reductions: one block of ROW_THREADS threads per row of `cols` values. Statistics are f32
// tree sums (the CPU backend sums sequentially in f32; the reference in f64).

// 1 / sqrt(mean(x^2) + eps) of this block's row.
__device__ __forceinline__ float rms_inv(const float* x, u64 base, u64 cols, float eps,
                                         float* scratch) {
    float ss = 0.0f;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = x[base + c];
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    return 1.0f / sqrtf(ss / (float)cols + eps);
}

// out = x / sqrt(mean(x^2) + eps) * w; w: [cols] f32 (vectors are widened at upload).
extern "C" __global__ void rms_norm(float* out, const float* x, const float* w, u64 cols, float eps) {
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * cols;
    const float inv = rms_inv(x, base, cols, eps, scratch);
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) out[base + c] = x[base + c] * inv * w[c];
}

// rms_norm, also writing the next projections' GEMM operands (see store_with_operands).
template <typename T>
__device__ void rms_norm_ops(float* out, T* hi, T* lo, const float* x, const float* w, u64 cols,
                             float eps) {
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * cols;
    const float inv = rms_inv(x, base, cols, eps, scratch);
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x)
        store_with_operands(out, hi, lo, base + c, x[base + c] * inv * w[c]);
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
    float s = 0.0f;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) s += x[base + c];
    const float mean = block_sum(s, scratch) / (float)cols;
    float v = 0.0f;
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = x[base + c] - mean;
        v += d * d;
    }
    const float inv = 1.0f / sqrtf(block_sum(v, scratch) / (float)cols + eps);
    for (u64 c = threadIdx.x; c < cols; c += blockDim.x)
        out[base + c] = (x[base + c] - mean) * inv * w[c] + b[c];
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
