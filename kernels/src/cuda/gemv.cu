// out[m, n] = x[m, k] . w[n, k]^T for a few rows (m <= GEMV_MAX_ROWS): decode-time linear layers
// over f16/bf16 weights, with the activation kept in f32 and f32 accumulation, exactly the math
// of the CPU backend (it widens each weight and multiplies in f32). One warp per output column;
// the warp streams that weight row once for all m rows, so weights are read once (memory-bound).
#define GEMV_MAX_ROWS 8

template <typename T>
__device__ void gemv(float* out, const float* x, const T* w, u32 m, u64 k, u64 n) {
    const u32 lane = threadIdx.x & 31u;
    const u64 warps = blockDim.x >> 5;
    for (u64 j = (u64)blockIdx.x * warps + (threadIdx.x >> 5); j < n; j += (u64)gridDim.x * warps) {
        float acc[GEMV_MAX_ROWS];
#pragma unroll
        for (u32 i = 0; i < GEMV_MAX_ROWS; i++) acc[i] = 0.0f;
        const T* wr = w + j * k;
        for (u64 p = lane; p < k; p += 32) {
            const float wv = to_f32(wr[p]);
#pragma unroll
            for (u32 i = 0; i < GEMV_MAX_ROWS; i++)
                if (i < m) acc[i] += x[i * k + p] * wv;
        }
#pragma unroll
        for (u32 i = 0; i < GEMV_MAX_ROWS; i++) {
            if (i < m) {
                const float s = warp_sum(acc[i]);
                if (lane == 0) out[i * n + j] = s;
            }
        }
    }
}

extern "C" __global__ void gemv_f16(float* out, const float* x, const f16* w, u32 m, u64 k, u64 n) {
    gemv(out, x, w, m, k, n);
}
extern "C" __global__ void gemv_bf16(float* out, const float* x, const bf16* w, u32 m, u64 k, u64 n) {
    gemv(out, x, w, m, k, n);
}
