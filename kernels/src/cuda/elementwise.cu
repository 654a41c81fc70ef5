// Elementwise kernels and row gathers. All grid-stride over `n` elements.

// out[r, :] = widen(table[ids[r], :]); table: [vocab, dim] T, out: [n_ids, dim] f32.
// Ids are range-checked on the host. Also serves gather_rows (T = float).
template <typename T>
__device__ void gather_rows(float* out, const T* table, const u32* ids, u64 n_ids, u64 dim) {
    const u64 n = n_ids * dim;
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const u64 r = i / dim, c = i - r * dim;
        out[i] = to_f32(table[(u64)ids[r] * dim + c]);
    }
}

extern "C" __global__ void embedding_f32(float* out, const float* table, const u32* ids, u64 n_ids, u64 dim) {
    gather_rows(out, table, ids, n_ids, dim);
}
extern "C" __global__ void embedding_f16(float* out, const f16* table, const u32* ids, u64 n_ids, u64 dim) {
    gather_rows(out, table, ids, n_ids, dim);
}
extern "C" __global__ void embedding_bf16(float* out, const bf16* table, const u32* ids, u64 n_ids, u64 dim) {
    gather_rows(out, table, ids, n_ids, dim);
}

// dst[0, bytes) = src[0, bytes), src in page-locked host memory that the SMs read over PCIe
// (unified addressing). Small uploads take this path instead of a copy engine: host-to-device
// copies from every stream queue on the same engine, so a few bytes of block table would
// otherwise wait behind a whole layer's weights on their way in. Both pointers 16-byte aligned.
extern "C" __global__ void copy_from_host(unsigned char* dst, const unsigned char* src, u64 bytes) {
    const u64 words = bytes / 16;
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    for (u64 i = global_thread(); i < words; i += grid_threads()) d[i] = s[i];
    for (u64 i = words * 16 + global_thread(); i < bytes; i += grid_threads()) dst[i] = src[i];
}

// x = hi + lo with hi = round(x) and lo = round(x - hi) in T: two half-precision terms that carry
// ~16 (bf16) or ~22 (f16) bits of x, so a GEMM over both keeps f32-like accuracy on tensor cores.
// (x - hi is exact in f32.)
template <typename T>
__device__ void split(T* hi, T* lo, const float* x, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const float v = x[i];
        const T h = from_f32<T>(v);
        hi[i] = h;
        lo[i] = from_f32<T>(v - to_f32(h));
    }
}

extern "C" __global__ void split_f16(f16* hi, f16* lo, const float* x, u64 n) { split(hi, lo, x, n); }
extern "C" __global__ void split_bf16(bf16* hi, bf16* lo, const float* x, u64 n) { split(hi, lo, x, n); }

// out = round(x) in T (nearest even): the one-rounding GEMM operand (GemmPrecision::Rounded).
template <typename T>
__device__ void round_to(T* out, const float* x, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) out[i] = from_f32<T>(x[i]);
}

extern "C" __global__ void round_f16(f16* out, const float* x, u64 n) { round_to(out, x, n); }
extern "C" __global__ void round_bf16(bf16* out, const float* x, u64 n) { round_to(out, x, n); }

// Stores v as out[i] and, for a producer whose output feeds a tensor-core GEMM, that GEMM's
// operands in the same pass (bit-identical to the round / split kernels): hi = round(v) and,
// unless lo is null, lo = round(v - hi).
template <typename T>
__device__ __forceinline__ void store_with_operands(float* out, T* hi, T* lo, u64 i, float v) {
    out[i] = v;
    const T h = from_f32<T>(v);
    hi[i] = h;
    if (lo != nullptr) lo[i] = from_f32<T>(v - to_f32(h));
}

// out: [rows, cols] += bias: [cols] (broadcast over rows); n = rows * cols.
extern "C" __global__ void bias_add(float* out, const float* bias, u64 n, u64 cols) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) out[i] += bias[i % cols];
}

extern "C" __global__ void add_inplace(float* x, const float* y, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) x[i] += y[i];
}

// max(v, 0); NaN becomes 0, as Rust's f32::max does.
extern "C" __global__ void relu_inplace(float* x, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) x[i] = fmaxf(x[i], 0.0f);
}

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up, in the CPU backend's order.
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

extern "C" __global__ void swiglu(float* out, const float* gate, const float* up, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) out[i] = silu_mul(gate[i], up[i]);
}

// swiglu, also writing the down projection's GEMM operands (see store_with_operands).
template <typename T>
__device__ void swiglu_ops(float* out, T* hi, T* lo, const float* gate, const float* up, u64 n) {
    for (u64 i = global_thread(); i < n; i += grid_threads())
        store_with_operands(out, hi, lo, i, silu_mul(gate[i], up[i]));
}

extern "C" __global__ void swiglu_ops_f16(float* out, f16* hi, f16* lo, const float* gate,
                                          const float* up, u64 n) {
    swiglu_ops(out, hi, lo, gate, up, n);
}
extern "C" __global__ void swiglu_ops_bf16(float* out, bf16* hi, bf16* lo, const float* gate,
                                           const float* up, u64 n) {
    swiglu_ops(out, hi, lo, gate, up, n);
}
