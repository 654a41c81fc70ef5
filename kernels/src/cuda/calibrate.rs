//! Measurements of one GPU for `strata calibrate`: the dense GEMM rate of cuBLAS per dtype, the
//! device-memory copy rate, host ↔ device copies from page-locked memory, and the fixed cost of
//! one small op, each timed with CUDA events on one stream.
//!
//! [`DeviceCalibrator`] holds its own handle on the device's primary context, one stream and one
//! cuBLAS handle, and nothing else: it compiles no kernels, so it starts in under a second even
//! when the PTX cache is cold (a [`super::CudaBackend`] may compile for 10–20 s on first use).
//! Every timed loop runs `reps` operations between two events, after one untimed warm-up, and
//! reports the best of `trials` such loops. GEMM inputs are pseudo-random (tensor cores draw less
//! power, and may clock higher, on zeros), and every buffer is freed when the call returns.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice};
use half::slice::HalfFloatSliceExt;

use super::device::{self, CudaUnavailable, DeviceInfo};
use super::device_err;
use crate::{DType, Result};

/// A GPU opened for measurement only (see the module header).
pub struct DeviceCalibrator {
    info: DeviceInfo,
    /// Declared before `stream` and `ctx`: the handle is destroyed before its stream.
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for DeviceCalibrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceCalibrator({})", self.info)
    }
}

impl DeviceCalibrator {
    /// Opens CUDA device `device`, or says why it cannot (never panics).
    pub fn new(device: usize) -> std::result::Result<Self, CudaUnavailable> {
        let info = device::find(device)?;
        let setup = |detail: String| CudaUnavailable::Setup { device, detail };
        device::guard(
            || {
                let ctx = CudaContext::new(device).map_err(|e| setup(e.to_string()))?;
                // SAFETY: all work of this calibrator runs on the one stream made below, in
                // program order, so cudarc's cross-stream events are not needed.
                unsafe { ctx.disable_event_tracking() };
                let stream = ctx.new_stream().map_err(|e| setup(e.to_string()))?;
                let blas = CudaBlas::new(stream.clone()).map_err(|e| setup(e.to_string()))?;
                Ok(DeviceCalibrator {
                    info: info.clone(),
                    blas,
                    stream,
                    ctx,
                })
            },
            |msg| setup(format!("the CUDA bindings panicked: {msg}")),
        )
    }

    pub fn device_info(&self) -> &DeviceInfo {
        &self.info
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| device_err("mem_get_info", e))
    }

    /// Dense GEMM rate in TFLOP/s (`2·n³` FLOPs per GEMM): `C = A·B`, all `[n, n]` in `dtype`,
    /// f32 accumulation; f16/bf16 run on tensor cores (cublasGemmEx), f32 is full-precision
    /// SGEMM (no TF32), as the backend's `linear` runs it.
    pub fn gemm_tflops(&self, dtype: DType, n: usize, reps: usize, trials: usize) -> Result<f64> {
        let wide = pseudo_random(n * n);
        let ms = match dtype {
            DType::F32 => self.gemm_ms(&wide, 1.0f32, 0.0f32, n, reps, trials)?,
            DType::F16 => {
                let mut v = vec![half::f16::ZERO; wide.len()];
                v.convert_from_f32_slice(&wide);
                self.gemm_ms(&v, half::f16::ONE, half::f16::ZERO, n, reps, trials)?
            }
            DType::BF16 => {
                let mut v = vec![half::bf16::ZERO; wide.len()];
                v.convert_from_f32_slice(&wide);
                self.gemm_ms(&v, half::bf16::ONE, half::bf16::ZERO, n, reps, trials)?
            }
        };
        Ok(2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12)
    }

    fn gemm_ms<T: DeviceRepr + Copy>(
        &self,
        host: &[T],
        one: T,
        zero: T,
        n: usize,
        reps: usize,
        trials: usize,
    ) -> Result<f64>
    where
        CudaBlas: Gemm<T>,
    {
        let op = "gemm_tflops";
        let s = &self.stream;
        let a = s.clone_htod(host).map_err(|e| device_err(op, e))?;
        let b = s.clone_htod(host).map_err(|e| device_err(op, e))?;
        // SAFETY: C is written in full by every GEMM (beta = 0) and never read on the host.
        let mut c = unsafe { s.alloc::<T>(n * n) }.map_err(|e| device_err(op, e))?;
        let dim = i32::try_from(n).map_err(|_| device_err(op, format!("n = {n} too large")))?;
        let cfg = square_gemm(dim, one, zero);
        self.best_ms(op, reps, trials, || {
            // SAFETY: A, B and C each hold n·n elements, column-major n × n with leading
            // dimension n: every access is in bounds; all three live on the handle's stream.
            unsafe { self.blas.gemm(cfg, &a, &b, &mut c) }.map_err(|e| device_err(op, e))
        })
    }

    /// The fixed cost of one small device op issued the way the backend issues it: a
    /// stream-ordered allocation of its output, one cuBLAS launch of negligible work (a 64 × 64
    /// SGEMM), and the output's free. Microseconds per op on the stream's timeline, which for ops
    /// this small is the host's issue time (the GPU waits for it): what a decode layer pays per
    /// op on top of its bytes and FLOPs.
    pub fn op_overhead_us(&self, reps: usize, trials: usize) -> Result<f64> {
        let op = "op_overhead_us";
        let s = &self.stream;
        const N: usize = 64;
        let a = s.alloc_zeros::<f32>(N * N).map_err(|e| device_err(op, e))?;
        let b = s.alloc_zeros::<f32>(N * N).map_err(|e| device_err(op, e))?;
        let cfg = square_gemm(N as i32, 1.0f32, 0.0f32);
        let ms = self.best_ms(op, reps, trials, || {
            // SAFETY: written in full by the GEMM below (beta = 0) before anything reads it.
            let mut c = unsafe { s.alloc::<f32>(N * N) }.map_err(|e| device_err(op, e))?;
            // SAFETY: A, B and C each hold N·N f32, column-major N × N with leading dimension N;
            // all three live on the handle's stream.
            unsafe { self.blas.gemm(cfg, &a, &b, &mut c) }.map_err(|e| device_err(op, e))
            // `c` is freed here, stream-ordered after the GEMM.
        })?;
        Ok(ms * 1e3)
    }

    /// Bytes copied per second by a device-to-device copy of `bytes` bytes, in GB/s (each byte
    /// counted once: double it for bytes read + written).
    pub fn dtod_copy_gbps(&self, bytes: usize, reps: usize, trials: usize) -> Result<f64> {
        let op = "dtod_copy_gbps";
        let s = &self.stream;
        // Copy speed does not depend on the values (no memory compression on plain buffers).
        let src = s
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| device_err(op, e))?;
        let mut dst = s
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| device_err(op, e))?;
        let ms = self.best_ms(op, reps, trials, || {
            s.memcpy_dtod(&src, &mut dst).map_err(|e| device_err(op, e))
        })?;
        Ok(bytes as f64 / (ms * 1e-3) / 1e9)
    }

    /// `(host → device, device → host)` GB/s of copies of `bytes` bytes between page-locked host
    /// memory (`cuMemHostAlloc`, not write-combined: the CPU reads it too) and device memory.
    pub fn pinned_copy_gbps(&self, bytes: usize, reps: usize, trials: usize) -> Result<(f64, f64)> {
        let op = "pinned_copy_gbps";
        let s = &self.stream;
        let bytes = bytes.max(1);
        let (mut host, mut dev) = self.pinned_and_device(op, bytes)?;
        let h2d = self.best_ms(op, reps, trials, || {
            s.memcpy_htod(&host, &mut dev)
                .map_err(|e| device_err(op, e))
        })?;
        let d2h = self.best_ms(op, reps, trials, || {
            s.memcpy_dtoh(&dev, &mut host)
                .map_err(|e| device_err(op, e))
        })?;
        let gbps = |ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
        Ok((gbps(h2d), gbps(d2h)))
    }

    /// `bytes` of page-locked host memory (`cuMemHostAlloc`, not write-combined), filled, and as
    /// many of device memory, zeroed: the two ends of the copies timed here.
    fn pinned_and_device(
        &self,
        op: &'static str,
        bytes: usize,
    ) -> Result<(PinnedHostSlice<u8>, CudaSlice<u8>)> {
        // SAFETY: the buffer is filled below before any copy reads it.
        let mut host = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }
            .map_err(|e| device_err(op, e))?;
        host.as_mut_slice()
            .map_err(|e| device_err(op, e))?
            .fill(0x5a);
        let dev = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| device_err(op, e))?;
        Ok((host, dev))
    }

    /// Runs `f` on this thread while another thread keeps copying `bytes` of page-locked host
    /// memory to the device, one copy after another; returns `f`'s result and the host→device
    /// GB/s the copies kept up meanwhile (copies finished while `f` ran, over its duration).
    pub fn h2d_beside<R: Send>(&self, bytes: usize, f: impl FnOnce() -> R) -> Result<(R, f64)> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let op = "h2d_beside";
        let s = &self.stream;
        let bytes = bytes.max(1);
        let (host, mut dev) = self.pinned_and_device(op, bytes)?;
        s.synchronize().map_err(|e| device_err(op, e))?;
        let (stop, copies) = (AtomicBool::new(false), AtomicU64::new(0));
        std::thread::scope(|scope| {
            let copier = scope.spawn(|| -> Result<()> {
                self.ctx.bind_to_thread().map_err(|e| device_err(op, e))?;
                while !stop.load(Ordering::Relaxed) {
                    s.memcpy_htod(&host, &mut dev)
                        .map_err(|e| device_err(op, e))?;
                    s.synchronize().map_err(|e| device_err(op, e))?;
                    copies.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            });
            // One copy in flight before the clock starts.
            while copies.load(Ordering::Relaxed) == 0 && !copier.is_finished() {
                std::thread::yield_now();
            }
            let (c0, t0) = (copies.load(Ordering::Relaxed), std::time::Instant::now());
            let r = f();
            let (c1, secs) = (copies.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
            stop.store(true, Ordering::Relaxed);
            copier
                .join()
                .map_err(|_| device_err(op, "the copy thread panicked"))??;
            Ok((r, (c1 - c0) as f64 * bytes as f64 / secs / 1e9))
        })
    }

    /// Milliseconds per call of `f`: one warm-up call, then `trials` loops of `reps` calls
    /// between two timing events; the best loop's mean.
    fn best_ms(
        &self,
        op: &'static str,
        reps: usize,
        trials: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let s = &self.stream;
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..trials.max(1) {
            let e0 = s.record_event(flags).map_err(|e| device_err(op, e))?;
            for _ in 0..reps.max(1) {
                f()?;
            }
            let e1 = s.record_event(flags).map_err(|e| device_err(op, e))?;
            e1.synchronize().map_err(|e| device_err(op, e))?;
            let ms = e0.elapsed_ms(&e1).map_err(|e| device_err(op, e))? as f64;
            best = best.min(ms / reps.max(1) as f64);
        }
        s.synchronize().map_err(|e| device_err(op, e))?;
        Ok(best)
    }
}

/// `C = alpha·A·B + beta·C`, all `[n, n]` column-major with leading dimension `n`.
fn square_gemm<T>(n: i32, alpha: T, beta: T) -> GemmConfig<T> {
    GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n,
        n,
        k: n,
        alpha,
        lda: n,
        ldb: n,
        beta,
        ldc: n,
    }
}

/// `n` values in [-1, 1) from a xorshift generator (deterministic, cheap).
pub(crate) fn pseudo_random(n: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
