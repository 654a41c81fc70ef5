// Helpers shared by every strata kernel. This text is prepended to each .cu file of this folder
// and the whole is compiled as one NVRTC program (see compile.rs).
//
// No CUDA headers are included: f16 and bf16 are two-byte structs converted with PTX `cvt` and
// bit operations, so NVRTC needs no include path and a machine with only the driver, NVRTC and
// cuBLAS libraries (no toolkit headers) can run strata.
//
// Conventions: activations are f32; element counts and offsets are 64-bit (`u64`); elementwise
// kernels use grid-stride loops (the host caps the grid); row kernels run one block of
// ROW_THREADS threads per row.

typedef unsigned int u32;
typedef unsigned long long u64;

struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

#define ROW_THREADS 256
#define NEG_INF __uint_as_float(0xff800000u)

__device__ __forceinline__ float to_f32(float v) { return v; }

__device__ __forceinline__ float to_f32(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

__device__ __forceinline__ float to_f32(bf16 v) {
    return __uint_as_float(((u32)v.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}

// Round to nearest even, NaN kept quiet: the same rounding as the `half` crate's bf16::from_f32.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    u32 u = __float_as_uint(x);
    bf16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        b.bits = (unsigned short)(u >> 16);
    }
    return b;
}

__device__ __forceinline__ u64 global_thread() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ u64 grid_threads() {
    return (u64)gridDim.x * blockDim.x;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) of `v` over the block, returned to every thread. `scratch` holds 32 floats.
// Every thread of the block must call it (it synchronises).
__device__ float block_sum(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? scratch[threadIdx.x] : NEG_INF;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}
