// Rotary embeddings, rotate-half layout (dims i and i + head_dim/2 pair up), in place on
// x: [rows, heads * head_dim]. `pos_freq` is [rows] positions (already f32, converted on the host
// exactly as the CPU's `pos as f32`) followed by [head_dim / 2] inverse frequencies. The angle is
// one f32 product and cosf/sinf are taken in f32, as the CPU backend and transformers do; the
// program is compiled with --fmad=false so the rotation is not contracted into FMAs.
extern "C" __global__ void rope_inplace(float* x, const float* pos_freq, u64 rows, u64 heads, u64 head_dim) {
    const u64 half = head_dim / 2;
    const float* inv_freq = pos_freq + rows;
    const u64 n = rows * heads * half;
    for (u64 idx = global_thread(); idx < n; idx += grid_threads()) {
        const u64 i = idx % half, t = idx / half;
        const u64 h = t % heads, r = t / heads;
        const float angle = pos_freq[r] * inv_freq[i];
        const float c = cosf(angle), s = sinf(angle);
        const u64 base = r * heads * head_dim + h * head_dim;
        const float x1 = x[base + i], x2 = x[base + i + half];
        x[base + i] = x1 * c - x2 * s;
        x[base + i + half] = x2 * c + x1 * s;
    }
}
