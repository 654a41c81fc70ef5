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

/// AVX2+FMA tiles of the host attention kernel ([`crate::attention`]): widening loads of stored
/// K/V values, a `q·k` tile and a `p·v` tile that keep their accumulators in registers.
///
/// Every function here is `unsafe` and `#[inline(always)]`: it is called only from functions
/// compiled with `#[target_feature(enable = "avx2,fma")]` (plus `f16c` where `f16` values are
/// read) after a run-time check that the CPU has those features, and it reads memory through raw
/// pointers whose extents the caller guarantees (each function says which).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    /// A stored K/V element type that widens to f32 as it is loaded, eight lanes at a time.
    pub(crate) trait Widen: Copy {
        /// `p[0..8]` widened to f32.
        ///
        /// # Safety
        /// `p .. p + 8` is readable, and the CPU has AVX2 (and F16C for `f16`).
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Widen for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees eight readable f32 at `p` and AVX.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Widen for bf16 {
        /// bf16 bits are the high half of the f32's: zero-extend to 32 bits, shift left 16.
        #[inline(always)]
        unsafe fn load8(p: *const bf16) -> __m256 {
            // SAFETY: the caller guarantees eight readable bf16 (16 bytes) at `p` and AVX2;
            // `loadu` has no alignment requirement.
            unsafe {
                let h = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }

    impl Widen for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            // SAFETY: the caller guarantees eight readable f16 (16 bytes) at `p` and F16C.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
    }

    /// Asks for the cache lines holding `s[r]` (`r` clamped to `s`) to be brought into the
    /// cache: a hint, which never faults and never changes a result.
    #[inline(always)]
    pub(crate) fn prefetch<T>(s: &[T], r: std::ops::Range<usize>) {
        let size = std::mem::size_of::<T>();
        let end = r.end.min(s.len()) * size;
        let base = s.as_ptr().cast::<i8>();
        let mut at = r.start * size;
        while at < end {
            // SAFETY: a prefetch reads nothing the program sees and never faults; SSE is part of
            // x86-64. (`at < end` keeps the address inside `s` anyway.)
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at)) };
            at += 64;
        }
    }

    /// Lane `i` of the result is the sum of the lanes of `a[i]`.
    #[inline(always)]
    unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
        // SAFETY: register-only AVX arithmetic; the caller guarantees AVX.
        unsafe {
            // [a0 01, a0 23, a1 01, a1 23 | a0 45, a0 67, a1 45, a1 67], and so on.
            let s01 = _mm256_hadd_ps(a[0], a[1]);
            let s23 = _mm256_hadd_ps(a[2], a[3]);
            let s45 = _mm256_hadd_ps(a[4], a[5]);
            let s67 = _mm256_hadd_ps(a[6], a[7]);
            // [a0 0123, a1 0123, a2 0123, a3 0123 | a0 4567, a1 4567, ...]
            let s0123 = _mm256_hadd_ps(s01, s23);
            let s4567 = _mm256_hadd_ps(s45, s67);
            let lo = _mm256_permute2f128_ps::<0x20>(s0123, s4567);
            let hi = _mm256_permute2f128_ps::<0x31>(s0123, s4567);
            _mm256_add_ps(lo, hi)
        }
    }

    /// Dot products of `H` query rows with `T` K rows (`H · T == 8`, one register each):
    /// element `h · T + t` of the result is `q[h] · k[t]`. Each K load (widened once) serves all
    /// `H` query heads; the eight sums are reduced together at the end.
    ///
    /// # Safety
    /// `q .. q + H · hd` and each `k[t] .. k[t] + hd` are readable, `hd % 8 == 0`, and the CPU
    /// has AVX2 and FMA (and F16C when `E` is `f16`).
    #[inline(always)]
    pub(crate) unsafe fn qk_tile<E: Widen, const H: usize, const T: usize>(
        q: *const f32,
        k: [*const E; T],
        hd: usize,
    ) -> [f32; 8] {
        const { assert!(H * T == 8, "a q·k tile is eight accumulators") };
        // SAFETY: every load is within the extents the caller guarantees (`d + 8 <= hd`); the
        // rest is register arithmetic on features the caller guarantees.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; H];
            let mut d = 0;
            while d < hd {
                let kv: [__m256; T] = std::array::from_fn(|t| E::load8(k[t].add(d)));
                for (h, row) in acc.iter_mut().enumerate() {
                    let qv = _mm256_loadu_ps(q.add(h * hd + d));
                    for (a, kt) in row.iter_mut().zip(&kv) {
                        *a = _mm256_fmadd_ps(qv, *kt, *a);
                    }
                }
                d += 8;
            }
            let flat: [__m256; 8] = std::array::from_fn(|i| acc[i / T][i % T]);
            let mut out = [0.0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), hsum8(flat));
            out
        }
    }

    /// `o[h][0 .. 8W] += Σ_t p[h · p_stride + t] · v[t][0 .. 8W]` for `h < H`, `t < tokens`,
    /// with row `h` of `o` at `o + h · hd` and row `t` of `v` at `v + t · hd`. The `H · W`
    /// output registers stay in registers across all the tokens; each V load (widened once)
    /// serves all `H` query heads.
    ///
    /// # Safety
    /// `o + h · hd .. + 8W` is readable and writable (and no other live reference points into
    /// it) for `h < H`; `p + h · p_stride .. + tokens` and `v + t · hd .. + 8W` are readable for
    /// `h < H`, `t < tokens`; the CPU has AVX2 and FMA (and F16C when `E` is `f16`).
    #[inline(always)]
    pub(crate) unsafe fn pv_tile<E: Widen, const H: usize, const W: usize>(
        o: *mut f32,
        hd: usize,
        p: *const f32,
        p_stride: usize,
        v: *const E,
        tokens: usize,
    ) {
        // SAFETY: every access is within the extents the caller guarantees; the rest is
        // register arithmetic on features the caller guarantees.
        unsafe {
            let mut acc: [[__m256; W]; H] = std::array::from_fn(|h| {
                std::array::from_fn(|w| _mm256_loadu_ps(o.add(h * hd + 8 * w)))
            });
            for t in 0..tokens {
                let vt = v.add(t * hd);
                let vv: [__m256; W] = std::array::from_fn(|w| E::load8(vt.add(8 * w)));
                for (h, row) in acc.iter_mut().enumerate() {
                    let ph = _mm256_broadcast_ss(&*p.add(h * p_stride + t));
                    for (a, x) in row.iter_mut().zip(&vv) {
                        *a = _mm256_fmadd_ps(ph, *x, *a);
                    }
                }
            }
            for (h, row) in acc.iter().enumerate() {
                for (w, a) in row.iter().enumerate() {
                    _mm256_storeu_ps(o.add(h * hd + 8 * w), *a);
                }
            }
        }
    }

    /// Sum of the eight lanes of `v`.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only AVX arithmetic; the caller guarantees AVX.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    /// Dot products of `H` activation rows (`x + h · k`) with `T` weight rows: element `[h][t]`
    /// is `x[h] · w[t]`. The `H · T` accumulators stay in registers (at most 12 of the 16, with
    /// the `T` widened weights and one activation); each weight load, widened once, serves all
    /// `H` rows, which is what makes a decode step's MLP on the host read weights at memory pace.
    ///
    /// # Safety
    /// `x .. x + H · k` and each `w[t] .. w[t] + k` are readable, `k % 8 == 0`, and the CPU has
    /// AVX2 and FMA (and F16C when `E` is `f16`).
    #[inline(always)]
    pub(crate) unsafe fn gemv_tile<E: Widen, const H: usize, const T: usize>(
        x: *const f32,
        w: [*const E; T],
        k: usize,
    ) -> [[f32; T]; H] {
        const { assert!(H * T <= 12, "a GEMV tile keeps at most 12 accumulators") };
        // SAFETY: every load is within the extents the caller guarantees (`d + 8 <= k`); the rest
        // is register arithmetic on features the caller guarantees.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; H];
            let mut d = 0;
            while d < k {
                let wv: [__m256; T] = std::array::from_fn(|t| E::load8(w[t].add(d)));
                for (h, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(h * k + d));
                    for (a, wt) in row.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, *wt, *a);
                    }
                }
                d += 8;
            }
            acc.map(|row| row.map(|a| hsum(a)))
        }
    }
}
