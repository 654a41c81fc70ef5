//! `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias)` on the GPU; the paths, the two GEMM precision modes
//! ([`GemmPrecision`]) and their error bounds are described in the module header of `cuda`.
//!
//! cuBLAS is column-major: row-major `w: [n, k]` is the column-major `k × n` matrix `W`, row-major
//! `x: [m, k]` is `X` (`k × m`), and row-major `out: [m, n]` is `O` (`n × m`). So `O = Wᵀ · X`:
//! `gemm(transa = T, transb = N, m = n, n = m, k, lda = k, ldb = k, ldc = n)`. The f16/bf16
//! GEMMs run on cuBLASLt, autotuned per shape (`lt.rs`, the same layout), or on cuBLAS GemmEx
//! ([`GemmBackend`](super::GemmBackend): when asked for, without cuBLASLt, or for a shape
//! cuBLASLt does not take).

use std::ffi::c_void;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, PushKernelArg,
};

use super::lt::{HalfGemm, HalfType};
use super::{Inner, WeightBuf, device_err, kernels};
use crate::{Result, shape_err};

const OP: &str = "linear";

/// How `linear` feeds an f32 activation to the tensor-core GEMM when the weight is f16/bf16 and
/// the activation has more than `GEMV_MAX_ROWS` rows (the GEMV path for fewer rows is the same
/// in both modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GemmPrecision {
    /// The activation is split into `hi + lo` half-precision terms and the GEMM runs twice
    /// (`C = w · hi`, then `C += w · lo`): nearly f32-exact, twice the tensor-core work.
    #[default]
    Split,
    /// The activation is rounded once to the weight's dtype (nearest even) and the GEMM runs once,
    /// f32 accumulation and f32 output: what a bf16/f16 PyTorch model does, half the work.
    Rounded,
}

impl GemmPrecision {
    pub(super) fn to_u8(self) -> u8 {
        match self {
            GemmPrecision::Split => 0,
            GemmPrecision::Rounded => 1,
        }
    }

    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            1 => GemmPrecision::Rounded,
            _ => GemmPrecision::Split,
        }
    }
}

pub(super) fn linear(
    be: &Inner,
    x: &CudaSlice<f32>,
    cache: &OperandCache,
    m: usize,
    k: usize,
    w: &super::CudaWeight,
    bias: Option<&CudaSlice<f32>>,
) -> Result<CudaSlice<f32>> {
    let n = w.rows;
    let mut out = be.output(OP, m * n)?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let dims = Dims::new(m, k, n)?;
    be.ctx.bind_to_thread().map_err(|e| device_err(OP, e))?;
    if k == 0 {
        be.stream
            .memset_zeros(&mut out)
            .map_err(|e| device_err(OP, e))?;
    } else {
        let kn = &be.k;
        let mode = GemmPrecision::from_u8(be.gemm_precision.load(Ordering::Relaxed));
        match &w.data {
            WeightBuf::F32(ws) => sgemm(be, ws, x, &mut out, dims)?,
            WeightBuf::F16(ws) if m <= kernels::GEMV_MAX_ROWS => {
                gemv(be, &kn.gemv_f16, ws, x, &mut out, dims)?
            }
            WeightBuf::BF16(ws) if m <= kernels::GEMV_MAX_ROWS => {
                gemv(be, &kn.gemv_bf16, ws, x, &mut out, dims)?
            }
            WeightBuf::F16(ws) => half_gemm(
                be,
                (&kn.split_f16, &kn.round_f16),
                &cache.f16,
                HalfType::F16,
                mode,
                ws,
                x,
                &mut out,
                dims,
            )?,
            WeightBuf::BF16(ws) => half_gemm(
                be,
                (&kn.split_bf16, &kn.round_bf16),
                &cache.bf16,
                HalfType::BF16,
                mode,
                ws,
                x,
                &mut out,
                dims,
            )?,
        }
    }
    if let Some(b) = bias {
        let (total, cols) = ((m * n) as u64, n as u64);
        let mut l = be.stream.launch_builder(&be.k.bias_add);
        l.arg(&mut out).arg(b).arg(&total).arg(&cols);
        // SAFETY: bias_add(float* out, const float* bias, u64 n, u64 cols); `out` holds m * n
        // values and `bias` n (checked by the caller).
        unsafe { l.launch(kernels::elementwise(m * n)) }.map_err(|e| device_err(OP, e))?;
    }
    Ok(out)
}

/// The problem size, checked to fit cuBLAS's `int` dimensions.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    k: usize,
    n: usize,
}

impl Dims {
    fn new(m: usize, k: usize, n: usize) -> Result<Self> {
        let limit = i32::MAX as usize;
        if m > limit || k > limit || n > limit || m * k > isize::MAX as usize {
            return Err(shape_err(
                OP,
                format!("[{m}, {k}] x [{n}, {k}] exceeds cuBLAS's 32-bit dimensions"),
            ));
        }
        Ok(Self { m, k, n })
    }
    fn cublas(self) -> (i32, i32, i32) {
        // In range by construction.
        (self.n as i32, self.m as i32, self.k as i32)
    }
}

fn sgemm(
    be: &Inner,
    w: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    d: Dims,
) -> Result<()> {
    let (cm, cn, ck) = d.cublas();
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: cm,
        n: cn,
        k: ck,
        alpha: 1.0f32,
        lda: ck,
        ldb: ck,
        beta: 0.0f32,
        ldc: cm,
    };
    // SAFETY: column-major A = w is k × n (lda = k, n * k values), B = x is k × m (ldb = k,
    // m * k values), C = out is n × m (ldc = n, m * n values): every access is in bounds. All
    // three live on the handle's stream.
    unsafe { be.blas.gemm(cfg, w, x, out) }.map_err(|e| device_err(OP, e))
}

fn gemv<T: DeviceRepr>(
    be: &Inner,
    f: &CudaFunction,
    w: &CudaSlice<T>,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    d: Dims,
) -> Result<()> {
    let (m, k, n) = (d.m as u32, d.k as u64, d.n as u64);
    let mut l = be.stream.launch_builder(f);
    l.arg(out).arg(x).arg(w).arg(&m).arg(&k).arg(&n);
    // SAFETY: gemv_{f16,bf16}(float* out, const float* x, const T* w, u32 m, u64 k, u64 n) with
    // T the element type of `w`; 1 <= m <= GEMV_MAX_ROWS (the caller's match), k, n > 0; `out`
    // holds m * n values, `x` m * k, `w` n * k; the kernel reads only those and writes each
    // output once, for any launch geometry of the `(32, S, G)` shape `kernels::gemv` builds.
    unsafe { l.launch(kernels::gemv(d.m, d.k, d.n)) }.map_err(|e| device_err(OP, e))?;
    Ok(())
}

/// The half-precision GEMM operands of one activation tensor: `hi = round(x)` and, for
/// [`GemmPrecision::Split`], `lo = round(x - hi)`. Made once per tensor and dtype by the first
/// `linear` that needs them, so the projections that share an input (q, k and v; gate and up)
/// convert it once; the tensor drops them when it is written.
#[derive(Default)]
pub(super) struct OperandCache {
    f16: OnceLock<Operands<half::f16>>,
    bf16: OnceLock<Operands<half::bf16>>,
}

pub(super) struct Operands<T> {
    hi: CudaSlice<T>,
    lo: Option<CudaSlice<T>>,
}

impl<T: DeviceRepr> Operands<T> {
    /// Uninitialised `hi` (and `lo` when `need_lo`) of `len` values, for a kernel (the round or
    /// split kernel, or a producer's `*_ops_*` kernel) to fill before any GEMM reads them.
    fn alloc(be: &Inner, len: usize, need_lo: bool) -> Result<Self> {
        // SAFETY: every caller launches the kernel that writes all `len` values of both buffers
        // on this stream before a GEMM (stream-ordered after it) reads them.
        let hi = unsafe { be.stream.alloc::<T>(len) }.map_err(|e| device_err(OP, e))?;
        let lo = if need_lo {
            // SAFETY: as `hi`.
            Some(unsafe { be.stream.alloc::<T>(len) }.map_err(|e| device_err(OP, e))?)
        } else {
            None
        };
        Ok(Operands { hi, lo })
    }
}

/// No f16/bf16 matrix weight uploaded yet, or the dtype of the last one: what a producer kernel
/// writes its output's GEMM operands in (`Inner::operand_dtype`).
pub(super) const OPERANDS_NONE: u8 = 0;
pub(super) const OPERANDS_F16: u8 = 1;
pub(super) const OPERANDS_BF16: u8 = 2;

/// The GEMM operands a producer kernel (RMSNorm, SwiGLU) writes in the same pass as its f32
/// output, so the projections after it convert nothing: allocated here, filled by the producer's
/// `*_ops_*` kernel, then handed to the output tensor's [`OperandCache`].
pub(super) enum ProducedOperands {
    F16(Operands<half::f16>),
    BF16(Operands<half::bf16>),
}

impl ProducedOperands {
    /// Operands for an output of `rows` rows and `len` values, or `None` when it will not feed a
    /// tensor-core GEMM: no f16/bf16 matrix weight was uploaded, or `rows` is small enough for
    /// the GEMV path (which reads the f32 activation).
    pub(super) fn alloc(be: &Inner, rows: usize, len: usize) -> Result<Option<Self>> {
        if rows <= kernels::GEMV_MAX_ROWS || len == 0 {
            return Ok(None);
        }
        let need_lo = GemmPrecision::from_u8(be.gemm_precision.load(Ordering::Relaxed))
            == GemmPrecision::Split;
        Ok(match be.operand_dtype.load(Ordering::Relaxed) {
            OPERANDS_F16 => Some(Self::F16(Operands::alloc(be, len, need_lo)?)),
            OPERANDS_BF16 => Some(Self::BF16(Operands::alloc(be, len, need_lo)?)),
            _ => None,
        })
    }

    /// The producer kernel for these operands' dtype.
    pub(super) fn pick<'k>(
        &self,
        f16: &'k CudaFunction,
        bf16: &'k CudaFunction,
    ) -> &'k CudaFunction {
        match self {
            Self::F16(_) => f16,
            Self::BF16(_) => bf16,
        }
    }

    /// Pushes the kernel arguments `T* hi, T* lo` (`lo` null when rounded).
    pub(super) fn push_args<'a>(&'a mut self, b: &mut LaunchArgs<'a>, null: &'a u64) {
        fn push<'a, T: DeviceRepr>(
            ops: &'a mut Operands<T>,
            b: &mut LaunchArgs<'a>,
            null: &'a u64,
        ) {
            b.arg(&mut ops.hi);
            match &mut ops.lo {
                Some(lo) => b.arg(lo),
                None => b.arg(null),
            };
        }
        match self {
            Self::F16(o) => push(o, b, null),
            Self::BF16(o) => push(o, b, null),
        }
    }

    /// The cache the output tensor carries, already filled.
    pub(super) fn into_cache(self) -> OperandCache {
        let cache = OperandCache::default();
        match self {
            Self::F16(o) => {
                let _ = cache.f16.set(o);
            }
            Self::BF16(o) => {
                let _ = cache.bf16.set(o);
            }
        }
        cache
    }
}

/// `out = x · wᵀ` with `w` in f16/bf16 (`T`, `dtype`) on tensor cores: the activation's operands
/// (converted by the `round` or `split` kernel, or taken from `cache`), then one GEMM
/// (`Rounded`: `C = w · hi`) or two (`Split`: `C = w · hi`, then `C += w · lo`), f32 compute
/// and f32 output, on cuBLASLt (autotuned) or cuBLAS GemmEx.
#[allow(clippy::too_many_arguments)]
fn half_gemm<T: DeviceRepr>(
    be: &Inner,
    (split, round): (&CudaFunction, &CudaFunction),
    cache: &OnceLock<Operands<T>>,
    dtype: HalfType,
    mode: GemmPrecision,
    w: &CudaSlice<T>,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    d: Dims,
) -> Result<()> {
    let need_lo = mode == GemmPrecision::Split;
    let fresh;
    let ops = match cache.get() {
        Some(o) if o.lo.is_some() || !need_lo => o,
        cached => {
            fresh = convert(be, split, round, need_lo, x, d.m * d.k)?;
            // Keep the first conversion; a Split call after a Rounded one converts for itself.
            if cached.is_none() {
                let _ = cache.set(fresh);
                cache.get().ok_or_else(|| device_err(OP, "operand cache"))?
            } else {
                &fresh
            }
        }
    };
    let (cm, cn, ck) = d.cublas();
    let s = &be.stream;
    let (w_ptr, _w) = w.device_ptr(s);
    let (hi_ptr, _hi) = ops.hi.device_ptr(s);
    let lo_ptr = ops.lo.as_ref().map(|lo| lo.device_ptr(s).0);
    let (out_ptr, _out) = out.device_ptr_mut(s);
    let alpha = 1.0f32;
    let passes: &[(u64, f32)] = match (mode, lo_ptr) {
        (GemmPrecision::Split, Some(lo_ptr)) => &[(hi_ptr, 0.0), (lo_ptr, 1.0)],
        _ => &[(hi_ptr, 0.0)],
    };
    let blas_type = dtype.cublas();
    let gemm_ex = || -> Result<()> {
        for &(b_ptr, beta) in passes {
            // SAFETY: the same column-major layout as `sgemm` (A = w: k × n, B = hi or lo: k × m,
            // C = out: n × m, f32), with A and B in `blas_type` (f16 or bf16, matching T), f32
            // compute and f32 output, a combination cublasGemmEx supports. `alpha`/`beta` are
            // host scalars read during the call (host pointer mode, the default). All buffers
            // live on the handle's stream, in order after the split kernel.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *be.blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    cm,
                    cn,
                    ck,
                    (&alpha as *const f32).cast::<c_void>(),
                    w_ptr as *const c_void,
                    blas_type,
                    ck,
                    b_ptr as *const c_void,
                    blas_type,
                    ck,
                    (&beta as *const f32).cast::<c_void>(),
                    out_ptr as *mut c_void,
                    cudaDataType_t::CUDA_R_32F,
                    cm,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| device_err(OP, e))?;
        }
        Ok(())
    };
    if let Some(lt) = be.lt_selected() {
        let g = HalfGemm {
            m: d.m,
            n: d.n,
            k: d.k,
            dtype,
            precision: mode,
            w: w_ptr,
            passes,
            out: out_ptr,
        };
        if lt.matmul(&be.stream, &g, &gemm_ex)? {
            return Ok(());
        }
    }
    gemm_ex()
}

/// Converts `x` (`len` values) into GEMM operands: `hi` alone (`round` kernel) or `hi` and `lo`
/// (`split` kernel).
fn convert<T: DeviceRepr>(
    be: &Inner,
    split: &CudaFunction,
    round: &CudaFunction,
    need_lo: bool,
    x: &CudaSlice<f32>,
    len: usize,
) -> Result<Operands<T>> {
    let mut ops = Operands::<T>::alloc(be, len, need_lo)?;
    let len64 = len as u64;
    match &mut ops.lo {
        None => {
            let mut l = be.stream.launch_builder(round);
            l.arg(&mut ops.hi).arg(x).arg(&len64);
            // SAFETY: round_{f16,bf16}(T* out, const float* x, u64 n) with T the element type
            // of `hi`; both hold `len` values.
            unsafe { l.launch(kernels::elementwise(len)) }.map_err(|e| device_err(OP, e))?;
        }
        Some(lo) => {
            let mut l = be.stream.launch_builder(split);
            l.arg(&mut ops.hi).arg(lo).arg(x).arg(&len64);
            // SAFETY: split_{f16,bf16}(T* hi, T* lo, const float* x, u64 n) with T the element
            // type of `hi`/`lo`; all three hold `len` values.
            unsafe { l.launch(kernels::elementwise(len)) }.map_err(|e| device_err(OP, e))?;
        }
    }
    Ok(ops)
}
