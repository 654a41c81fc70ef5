//! Small vector helpers shared by the CPU kernels. They are written so LLVM vectorises them, and
//! they are `#[inline(always)]` so that a caller compiled with AVX2+FMA (chosen at run time)
//! gets AVX2 code for them too.

/// `Σ a[i] · b[i]` with sixteen independent accumulators (two AVX registers' worth).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}
