//! The CUDA backend: the [`Backend`] ops on one NVIDIA GPU, through cudarc with dynamic loading
//! (the same binary runs on machines with and without CUDA; [`CudaBackend::new`] says why it
//! cannot run, and never panics).
//!
//! - **State.** One context, one stream, one cuBLAS handle, and the kernel table, all made once
//!   in [`CudaBackend::new`]. Every op is enqueued on the stream in call order, so no event
//!   tracking is needed (cudarc's per-buffer events are switched off). Buffers are allocated
//!   stream-ordered and freed when dropped.
//! - **Tensors** are `[rows, cols]` f32 in device memory. **Weights** keep their stored dtype
//!   (f32/f16/bf16), except vectors (one row or one column: norm scales, biases), which are
//!   widened to f32 at upload: exact, tiny, and it keeps the norm and bias kernels single-typed.
//! - **Kernels** are the `.cu` files of this folder, compiled by NVRTC at start (see `compile`),
//!   with `--fmad=false`. Elementwise, norm, softmax and RoPE kernels follow the CPU backend's
//!   formulas in f32 (statistics are tree sums instead of sequential ones).
//! - **`linear`** (`out = x · wᵀ + bias`; the cuBLAS layout mapping is in `linear.rs`):
//!   - f32 weights: cuBLAS SGEMM (full f32; cuBLAS does not use TF32 unless asked).
//!   - f16/bf16 weights, up to 8 rows (decode): the `gemv_*` kernel, f32 activation × widened
//!     weight, f32 accumulation — the CPU backend's math.
//!   - f16/bf16 weights, more rows (prefill): a tensor-core GEMM with f16/bf16 inputs, f32
//!     compute and **f32 output**, on cuBLASLt with the algorithm autotuned per shape and
//!     recorded per machine (the default; `lt.rs`, `gemm_record.rs`; loaded on first use,
//!     GemmEx when libcublasLt is missing, see [`CudaBackend::lt_unavailable`], and for shapes
//!     it does not take) or, with [`CudaBackend::set_gemm_backend`] or `STRATA_GEMM=gemmex`
//!     ([`GemmBackend`]), on cuBLAS GemmEx, in one of two modes ([`GemmPrecision`], set per backend with
//!     [`CudaBackend::set_gemm_precision`]):
//!     - `Split` (the default): the activation is split into two half-precision terms `hi + lo`
//!       (`hi = round(x)`, `lo = round(x − hi)`) and the GEMM runs twice (`C += w · lo` after
//!       `C = w · hi`). The activation is carried to about 2⁻¹⁷ (bf16) or 2⁻²² (f16) relative,
//!       at twice the GEMM work.
//!     - `Rounded`: the activation is rounded once to the weight's dtype (nearest even, at most
//!       2⁻⁸ (bf16) or 2⁻¹¹ (f16) relative per element) and the GEMM runs once: the math of a
//!       bf16/f16 PyTorch model (which also rounds the activation, there when it is stored), at
//!       half the tensor-core work.
//!
//!     In both modes f16 activations beyond ±65504 overflow, as they would in an f16 model.
//!     The converted operands are cached on the input tensor (dropped when it is written), so
//!     projections sharing an input (q, k, v; gate, up) convert it once.
//! - **Errors.** Every op returns [`KernelError::Device`] on a CUDA failure. Failures the driver
//!   can only record (cudarc notes errors raised inside `Drop`) are kept as a *deferred error*:
//!   the next op returns it, and [`CudaBackend::deferred_error`] reports it.

mod attention;
pub mod calibrate;
mod compile;
mod device;
mod gemm_record;
mod kernels;
mod kvtier;
mod linear;
mod lt;
mod prefill;
mod rates;
mod staging;
mod transfer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut, PushKernelArg};

pub use attention::{
    DeviceBlockTables, DevicePartial, KvBlockShape, KvPool, StreamMark, choose_splits,
};
pub use compile::{KernelOrigin, default_ptx_cache_dir};
pub use device::{CudaUnavailable, DeviceInfo, probe};
pub use gemm_record::default_gemm_record_dir;
pub use kvtier::{CopyTicket, GatheredRows, HostRegistration};
pub use linear::GemmPrecision;
pub use lt::{GemmBackend, GemmChoice, GemmRecordInfo, GemmTuning, LT_MIN_ROWS, LtFallback};
pub use prefill::{DevicePagedTables, DeviceQueryRows, PrefillKernel, SeqBlocks};
pub use staging::{Fetched, PinnedWeight};
pub use transfer::{CopyStats, PendingDownload, TIMED_UPLOAD_MIN};

use crate::{Backend, DType, HostWeight, KernelError, Result, RopeTable, WeightData, shape_err};
use kernels::Kernels;

/// An f32 activation matrix `[rows, cols]` in device memory.
pub struct CudaTensor {
    rows: usize,
    cols: usize,
    /// At least `rows * cols` values (one, for an empty tensor). `None` only when the allocation
    /// of [`Backend::zeros`] failed; the failure is the backend's deferred error.
    data: Option<CudaSlice<f32>>,
    /// This tensor converted for tensor-core GEMMs, made by the first `linear` that needs it and
    /// reused by the next ones (q, k and v, or gate and up, share one input); dropped whenever
    /// the tensor is written.
    operands: linear::OperandCache,
}

impl CudaTensor {
    /// Drops the cached GEMM operands, so the next `linear` converts this tensor again (for
    /// benchmarks that time the conversion; writing the tensor does this too).
    pub fn forget_operands(&mut self) {
        self.operands = Default::default();
    }
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTensor[{}, {}]", self.rows, self.cols)
    }
}

/// A weight `[rows, cols]` in device memory, in its stored dtype (vectors widened to f32).
pub struct CudaWeight {
    rows: usize,
    cols: usize,
    data: WeightBuf,
}

enum WeightBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<half::f16>),
    BF16(CudaSlice<half::bf16>),
}

impl CudaWeight {
    /// The dtype kept on the device.
    pub fn dtype(&self) -> DType {
        match self.data {
            WeightBuf::F32(_) => DType::F32,
            WeightBuf::F16(_) => DType::F16,
            WeightBuf::BF16(_) => DType::BF16,
        }
    }
}

impl std::fmt::Debug for CudaWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = self.dtype().name();
        write!(f, "CudaWeight[{}, {}] {dtype}", self.rows, self.cols)
    }
}

/// The CUDA backend. Cloning is cheap and shares the device state.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    info: DeviceInfo,
    origin: KernelOrigin,
    blas: CudaBlas,
    /// cuBLASLt and its autotuned algorithms, or why it cannot be used (then GemmEx runs); made
    /// the first time it is selected or asked about.
    lt: OnceLock<std::result::Result<lt::LtGemm, String>>,
    /// The folder of the machine's GEMM tuning record (`None`: kept in memory only).
    gemm_record_dir: Option<PathBuf>,
    /// The [`GemmBackend`] asked for, as `GemmBackend::to_u8`.
    gemm_backend: AtomicU8,
    k: Kernels,
    attn: attention::AttentionKernels,
    kvt: kvtier::KvTierKernels,
    prefill: prefill::PrefillKernels,
    stream: Arc<CudaStream>,
    /// Host -> device copies that overlap compute (weight prefetch); ordered against `stream` by
    /// events.
    copy: Arc<CudaStream>,
    /// Device -> host spills of KV blocks, off `copy`: behind a weight prefetch there, a spill
    /// (and the host attention that waits for it before reading the spilled blocks) would wait
    /// for the next layer's weights to land. A copy engine per direction runs the two at once.
    spill: Arc<CudaStream>,
    /// The small, latency-bound copies of tiered attention (queries down, partials up), kept
    /// off `copy` so they never wait behind a weight prefetch or a spill (see `transfer`).
    xfer: Arc<CudaStream>,
    /// Copies from host memory one gather ahead of the compute stream (hidden states for
    /// recompute, [`CudaBackend::copy_host_pieces_beside`]); ordered by events.
    side: Arc<CudaStream>,
    /// Timed copies on `copy`, `spill` and `xfer` (see `transfer`).
    copies: Mutex<transfer::CopyLog>,
    ctx: Arc<CudaContext>,
    /// The first error an infallible trait method hit (see the module header).
    deferred: Mutex<Option<String>>,
    /// Fill every new output with NaN before the kernel that writes it (for tests).
    poison: AtomicBool,
    /// The f16/bf16 GEMM mode, a [`GemmPrecision`] as `GemmPrecision::to_u8`.
    gemm_precision: AtomicU8,
    /// The dtype of the f16/bf16 matrix weights uploaded (`linear::OPERANDS_*`): producers of
    /// GEMM inputs (RMSNorm, SwiGLU) write their output's operands in it.
    operand_dtype: AtomicU8,
    /// The last positions and frequencies `rope` uploaded, and their device copy (only ever
    /// read): a forward pass ropes q and k of every layer at the same positions, so one upload
    /// serves them all instead of two per layer.
    rope_positions: Mutex<Option<(Vec<f32>, CudaSlice<f32>)>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.inner.info)
    }
}

/// Keeps memory freed by stream-ordered frees in the device's default pool instead of returning
/// it to the OS at every synchronisation: a forward pass frees and reallocates the same large
/// activation buffers every layer and synchronises every step, and remapping them cost about
/// 0.3 ms per 512 MiB on an H100.
fn keep_freed_memory(ctx: &CudaContext) -> std::result::Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the default pool of the context's device (valid for the
    // context's lifetime); the attribute takes a pointer to a u64, alive for the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
    }
}

fn device_err(op: &'static str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Device {
        op,
        detail: e.to_string(),
    }
}

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(shape_err(
            op,
            format!("{what} has {got} values, expected {want}"),
        ));
    }
    Ok(())
}

impl CudaBackend {
    /// Opens CUDA device `device`, with the PTX cache in its default place.
    pub fn new(device: usize) -> std::result::Result<Self, CudaUnavailable> {
        Self::with_ptx_cache(device, default_ptx_cache_dir())
    }

    /// Opens CUDA device `device`, caching compiled kernels in `ptx_cache` (none: no cache), the
    /// GEMM tuning record in its default place.
    pub fn with_ptx_cache(
        device: usize,
        ptx_cache: Option<PathBuf>,
    ) -> std::result::Result<Self, CudaUnavailable> {
        Self::with_caches(device, ptx_cache, default_gemm_record_dir())
    }

    /// Opens CUDA device `device`, caching compiled kernels in `ptx_cache` and keeping the GEMM
    /// autotuner's record in `gemm_record` (either `None`: not kept on disk).
    pub fn with_caches(
        device: usize,
        ptx_cache: Option<PathBuf>,
        gemm_record: Option<PathBuf>,
    ) -> std::result::Result<Self, CudaUnavailable> {
        let info = device::find(device)?;
        let setup = |detail: String| CudaUnavailable::Setup { device, detail };
        device::guard(
            || {
                let ctx = CudaContext::new(device).map_err(|e| setup(e.to_string()))?;
                // SAFETY: this backend issues all its work on the one stream made below, in
                // program order, so cudarc's cross-stream events are not needed; buffers made
                // before this call (none) would keep theirs.
                unsafe { ctx.disable_event_tracking() };
                keep_freed_memory(&ctx).map_err(|e| setup(e.to_string()))?;
                let stream = ctx.new_stream().map_err(|e| setup(e.to_string()))?;
                let copy = ctx.new_stream().map_err(|e| setup(e.to_string()))?;
                let xfer = ctx.new_stream().map_err(|e| setup(e.to_string()))?;
                let spill = ctx.new_stream().map_err(|e| setup(e.to_string()))?;
                let side = ctx.new_stream().map_err(|e| setup(e.to_string()))?;
                let blas = CudaBlas::new(stream.clone()).map_err(|e| setup(e.to_string()))?;
                let ((k, attn, kvt, prefill), origin) = compile::build_module(
                    &ctx,
                    info.compute_capability,
                    ptx_cache.as_deref(),
                    |m| {
                        Ok((
                            Kernels::bind(m)?,
                            attention::AttentionKernels::bind(m)?,
                            kvtier::KvTierKernels::bind(m)?,
                            prefill::PrefillKernels::bind(m, info.compute_capability)?,
                        ))
                    },
                )
                .map_err(|detail| CudaUnavailable::Kernels { device, detail })?;
                Ok(CudaBackend {
                    inner: Arc::new(Inner {
                        info: info.clone(),
                        origin,
                        blas,
                        lt: OnceLock::new(),
                        gemm_record_dir: gemm_record.clone(),
                        gemm_backend: AtomicU8::new(GemmBackend::from_env().to_u8()),
                        k,
                        attn: attn.with_overlap(info.compute_capability),
                        kvt,
                        prefill,
                        stream,
                        copy,
                        spill,
                        xfer,
                        side,
                        copies: Mutex::new(transfer::CopyLog::default()),
                        ctx,
                        deferred: Mutex::new(None),
                        poison: AtomicBool::new(false),
                        rope_positions: Mutex::new(None),
                        gemm_precision: AtomicU8::new(GemmPrecision::default().to_u8()),
                        operand_dtype: AtomicU8::new(linear::OPERANDS_NONE),
                    }),
                })
            },
            |msg| setup(format!("the CUDA bindings panicked: {msg}")),
        )
    }

    pub fn device_info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Whether the kernels were compiled in this process or loaded from the PTX cache.
    pub fn kernel_origin(&self) -> &KernelOrigin {
        &self.inner.origin
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.inner
            .ctx
            .mem_get_info()
            .map_err(|e| device_err("mem_get_info", e))
    }

    /// Waits for all enqueued work; returns any error it raised.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.check("synchronize")?;
        self.inner
            .stream
            .synchronize()
            .map_err(|e| device_err("synchronize", e))
    }

    /// When on, every output buffer is filled with NaN before the kernel that should write all
    /// of it, so a kernel that skips an element is caught. For tests; it costs a memset per op.
    pub fn poison_outputs(&self, on: bool) {
        self.inner.poison.store(on, Ordering::Relaxed);
    }

    /// How `linear` runs f16/bf16 GEMMs of more than 8 rows from now on (see the module header);
    /// shared by every clone of this backend.
    pub fn set_gemm_precision(&self, p: GemmPrecision) {
        self.inner
            .gemm_precision
            .store(p.to_u8(), Ordering::Relaxed);
    }

    pub fn gemm_precision(&self) -> GemmPrecision {
        GemmPrecision::from_u8(self.inner.gemm_precision.load(Ordering::Relaxed))
    }

    /// Which library runs f16/bf16 GEMMs of more than 8 rows from now on (the default comes from
    /// `STRATA_GEMM`, see [`GemmBackend::ENV`]); shared by every clone of this backend. Asking
    /// for cuBLASLt where it is unavailable keeps GemmEx.
    pub fn set_gemm_backend(&self, b: GemmBackend) {
        self.inner.gemm_backend.store(b.to_u8(), Ordering::Relaxed);
    }

    /// The library that runs f16/bf16 GEMMs: GemmEx when asked for or when cuBLASLt is
    /// unavailable.
    pub fn gemm_backend(&self) -> GemmBackend {
        match self.inner.lt_selected() {
            Some(_) => GemmBackend::LtAutotuned,
            None => GemmBackend::GemmEx,
        }
    }

    /// Why cuBLASLt cannot be used on this machine (the GEMMs then run on GemmEx), if so
    /// (loads it to find out).
    pub fn lt_unavailable(&self) -> Option<&str> {
        self.inner.lt().as_ref().err().map(String::as_str)
    }

    /// The GEMM problems cuBLASLt has tuned so far and what it chose for each (GemmEx included,
    /// for problems it does not take), ordered by (n, k, m).
    pub fn gemm_tunings(&self) -> Vec<GemmTuning> {
        match self.inner.lt.get() {
            Some(Ok(lt)) => lt.tunings(),
            _ => Vec::new(),
        }
    }

    /// Seconds spent so far timing cuBLASLt's candidate algorithms for new GEMM problems (0 when
    /// every problem was restored from the machine's record, or cuBLASLt is not in use). A run
    /// subtracts it from the prefill or decode time it was spent in and reports it apart.
    pub fn gemm_tuning_seconds(&self) -> f64 {
        match self.inner.lt.get() {
            Some(Ok(lt)) => lt.tuning_seconds(),
            _ => 0.0,
        }
    }

    /// The machine's GEMM tuning record: where it is, what it holds, whether it could be used
    /// (`None` while cuBLASLt has not been loaded, or where it is unavailable).
    pub fn gemm_record(&self) -> Option<GemmRecordInfo> {
        match self.inner.lt.get() {
            Some(Ok(lt)) => lt.record_info(),
            _ => None,
        }
    }

    /// The first error hit by an op that cannot return one (`zeros`, `to_host`, `relu_inplace`,
    /// `softmax_inplace`), if any. Every fallible op returns it too.
    pub fn deferred_error(&self) -> Option<String> {
        self.inner.deferred.lock().ok().and_then(|g| g.clone())
    }
}

impl Inner {
    /// cuBLASLt, loaded on first use; never fails the backend (without it, GemmEx runs).
    fn lt(&self) -> &std::result::Result<lt::LtGemm, String> {
        self.lt
            .get_or_init(|| lt::LtGemm::new(&self.stream, &self.info, self.gemm_record_dir.clone()))
    }

    /// cuBLASLt, when it is selected and available.
    fn lt_selected(&self) -> Option<&lt::LtGemm> {
        match GemmBackend::from_u8(self.gemm_backend.load(Ordering::Relaxed)) {
            GemmBackend::LtAutotuned => self.lt().as_ref().ok(),
            GemmBackend::GemmEx => None,
        }
    }

    /// Records the dtype of an f16/bf16 matrix weight: the GEMM operand dtype producers write.
    fn note_matrix_weight(&self, data: &WeightBuf) {
        let dtype = match data {
            WeightBuf::F16(_) => linear::OPERANDS_F16,
            WeightBuf::BF16(_) => linear::OPERANDS_BF16,
            WeightBuf::F32(_) => return,
        };
        self.operand_dtype.store(dtype, Ordering::Relaxed);
    }

    /// Returns the deferred error, or one the driver recorded where it could not return it
    /// (cudarc records failures inside `Drop`).
    fn check(&self, op: &'static str) -> Result<()> {
        if let Err(e) = self.ctx.check_err() {
            self.defer(e.to_string());
        }
        match self.deferred.lock().ok().and_then(|g| g.clone()) {
            Some(msg) => Err(device_err(
                op,
                format!("an earlier CUDA operation failed: {msg}"),
            )),
            None => Ok(()),
        }
    }

    fn defer(&self, msg: String) {
        if let Ok(mut g) = self.deferred.lock()
            && g.is_none()
        {
            *g = Some(msg);
        }
    }

    /// An output buffer of `n` f32 (at least one), NaN-filled when poisoning.
    fn output(&self, op: &'static str, n: usize) -> Result<CudaSlice<f32>> {
        self.output_on(&self.stream, op, n)
    }

    /// [`Inner::output`] allocated (and freed when dropped) in `stream`'s order.
    fn output_on(
        &self,
        stream: &Arc<CudaStream>,
        op: &'static str,
        n: usize,
    ) -> Result<CudaSlice<f32>> {
        // SAFETY: the buffer is uninitialised; every caller launches a kernel that writes all
        // `n` values before anything reads them (or fills it first, below).
        let mut buf = unsafe { stream.alloc::<f32>(n.max(1)) }.map_err(|e| device_err(op, e))?;
        if self.poison.load(Ordering::Relaxed) {
            let bytes = buf.len() * std::mem::size_of::<f32>();
            let (ptr, _sync) = buf.device_ptr_mut(stream);
            // SAFETY: `ptr` addresses `bytes` bytes of the live allocation `buf`, used on its own
            // stream; all-ones bytes make every f32 a NaN.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream())
            }
            .map_err(|e| device_err(op, e))?;
        }
        Ok(buf)
    }

    /// Copies `data` to a new device buffer (one unused element when `data` is empty).
    /// Small ones in order on the compute stream without the host waiting (see
    /// [`Inner::upload_bytes`]); large ones (weights at load time) through a copy engine.
    fn upload<T: transfer::PlainBytes>(
        &self,
        op: &'static str,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        let bytes = std::mem::size_of_val(data);
        if bytes > transfer::SMALL_UPLOAD_BYTES {
            return self.stream.clone_htod(data).map_err(|e| device_err(op, e));
        }
        // SAFETY: written by the copy below before anything reads it (an empty tensor's
        // buffer is never read).
        let mut buf =
            unsafe { self.stream.alloc::<T>(data.len().max(1)) }.map_err(|e| device_err(op, e))?;
        {
            let (ptr, _sync) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `buf` holds data.len() values (16-byte aligned, as every allocation),
            // allocated on the compute stream, where the copy runs.
            unsafe { self.upload_bytes(op, ptr, transfer::as_bytes(data)) }?;
        }
        Ok(buf)
    }

    fn buf<'t>(&self, op: &'static str, t: &'t CudaTensor) -> Result<&'t CudaSlice<f32>> {
        self.check(op)?;
        t.data
            .as_ref()
            .ok_or_else(|| device_err(op, "tensor has no storage (its allocation failed)"))
    }

    fn buf_mut<'t>(
        &self,
        op: &'static str,
        t: &'t mut CudaTensor,
    ) -> Result<&'t mut CudaSlice<f32>> {
        self.check(op)?;
        t.operands = Default::default();
        t.data
            .as_mut()
            .ok_or_else(|| device_err(op, "tensor has no storage (its allocation failed)"))
    }

    /// A weight that must be an f32 vector of `len` values (norm scales, biases).
    fn vector<'w>(
        &self,
        op: &'static str,
        w: &'w CudaWeight,
        len: usize,
    ) -> Result<&'w CudaSlice<f32>> {
        check_len(op, "weight vector", w.rows * w.cols, len)?;
        match &w.data {
            WeightBuf::F32(b) => Ok(b),
            _ => Err(shape_err(
                op,
                format!("expected a vector, got a [{}, {}] matrix", w.rows, w.cols),
            )),
        }
    }

    fn tensor(rows: usize, cols: usize, data: CudaSlice<f32>) -> CudaTensor {
        CudaTensor {
            rows,
            cols,
            data: Some(data),
            operands: Default::default(),
        }
    }

    /// Copies rows `ids` of `table: [_, dim]` (widened to f32) into a new `[ids.len(), dim]`.
    fn gather<T>(
        &self,
        op: &'static str,
        f: &cudarc::driver::CudaFunction,
        table: &CudaSlice<T>,
        ids: &[u32],
        dim: usize,
    ) -> Result<CudaTensor> {
        let n = ids.len() * dim;
        let mut out = self.output(op, n)?;
        if n > 0 {
            let ids_dev = self.upload(op, ids)?;
            let (n_ids, dim64) = (ids.len() as u64, dim as u64);
            let mut b = self.stream.launch_builder(f);
            b.arg(&mut out)
                .arg(table)
                .arg(&ids_dev)
                .arg(&n_ids)
                .arg(&dim64);
            // SAFETY: `f` is one of the `embedding_*` kernels, (T* out, const T* table,
            // const u32* ids, u64 n_ids, u64 dim), with T matching `table`'s element type; `out`
            // holds n_ids * dim values and every id was checked against the table's rows.
            unsafe { b.launch(kernels::elementwise(n)) }.map_err(|e| device_err(op, e))?;
        }
        Ok(Self::tensor(ids.len(), dim, out))
    }

    /// Checks that `rows` rows fit one launch of a row kernel (one block per row).
    fn rows_fit(op: &'static str, rows: usize) -> Result<()> {
        if rows > i32::MAX as usize {
            return Err(shape_err(op, format!("{rows} rows exceed one launch")));
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload_weight(&self, w: HostWeight) -> Result<CudaWeight> {
        let be = &self.inner;
        be.check("upload_weight")?;
        let op = "upload_weight";
        let is_vector = w.rows == 1 || w.cols == 1;
        let data = match w.data {
            WeightData::F32(v) => WeightBuf::F32(be.upload(op, &v)?),
            other if is_vector => WeightBuf::F32(be.upload(op, &other.to_f32_vec())?),
            WeightData::F16(v) => WeightBuf::F16(be.upload(op, &v)?),
            WeightData::BF16(v) => WeightBuf::BF16(be.upload(op, &v)?),
        };
        be.note_matrix_weight(&data);
        Ok(CudaWeight {
            rows: w.rows,
            cols: w.cols,
            data,
        })
    }

    fn weight_shape(&self, w: &CudaWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CudaTensor> {
        check_len("tensor", "data", data.len(), rows * cols)?;
        self.inner.check("tensor")?;
        let buf = self.inner.upload("tensor", &data)?;
        Ok(Inner::tensor(rows, cols, buf))
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        self.inner.check("zeros")?;
        let data = self
            .inner
            .stream
            .alloc_zeros::<f32>((rows * cols).max(1))
            .map_err(|e| device_err("zeros", e))?;
        Ok(CudaTensor {
            rows,
            cols,
            data: Some(data),
            operands: Default::default(),
        })
    }

    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn to_host(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let n = t.rows * t.cols;
        let be = &self.inner;
        be.check("to_host")?;
        let buf = be.buf("to_host", t)?;
        let mut out = vec![0.0f32; n];
        if n > 0 {
            be.stream
                .memcpy_dtoh(&buf.slice(0..n), &mut out)
                .and_then(|()| be.stream.synchronize())
                .map_err(|e| device_err("to_host", e))?;
        }
        Ok(out)
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        let be = &self.inner;
        be.check("embedding")?;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(KernelError::TokenOutOfRange {
                id,
                vocab: table.rows,
            });
        }
        let (k, d) = (&be.k, table.cols);
        match &table.data {
            WeightBuf::F32(t) => be.gather("embedding", &k.embedding_f32, t, ids, d),
            WeightBuf::F16(t) => be.gather("embedding", &k.embedding_f16, t, ids, d),
            WeightBuf::BF16(t) => be.gather("embedding", &k.embedding_bf16, t, ids, d),
        }
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor> {
        let be = &self.inner;
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if w.cols != k {
            return Err(shape_err(
                "linear",
                format!("x is [{m}, {k}] but w is [{n}, {}]", w.cols),
            ));
        }
        let bias = bias.map(|b| be.vector("linear", b, n)).transpose()?;
        let xb = be.buf("linear", x)?;
        let out = linear::linear(be, xb, &x.operands, m, k, w, bias)?;
        Ok(Inner::tensor(m, n, out))
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let be = &self.inner;
        let op = "rms_norm";
        let (rows, cols) = (x.rows, x.cols);
        let wb = be.vector(op, w, cols)?;
        let xb = be.buf(op, x)?;
        Inner::rows_fit(op, rows)?;
        let mut out = be.output(op, rows * cols)?;
        let mut produced = linear::ProducedOperands::alloc(be, rows, rows * cols)?;
        if rows * cols > 0 {
            let cols64 = cols as u64;
            let null = 0u64;
            let f = match &produced {
                None => &be.k.rms_norm,
                Some(p) => p.pick(&be.k.rms_norm_ops_f16, &be.k.rms_norm_ops_bf16),
            };
            let mut b = be.stream.launch_builder(f);
            b.arg(&mut out);
            if let Some(p) = produced.as_mut() {
                p.push_args(&mut b, &null);
            }
            b.arg(xb).arg(wb).arg(&cols64).arg(&eps);
            // SAFETY: rms_norm(float* out, const float* x, const float* w, u64 cols, float eps),
            // or rms_norm_ops_{f16,bf16}(float* out, T* hi, T* lo, <the same>) with hi (and lo,
            // or null) of `produced`'s dtype; one block per row; `out`, `x`, hi and lo hold
            // rows * cols values, `w` cols values.
            unsafe { b.launch(kernels::per_row(rows)) }.map_err(|e| device_err(op, e))?;
        }
        let mut t = Inner::tensor(rows, cols, out);
        if let Some(p) = produced {
            t.operands = p.into_cache();
        }
        Ok(t)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        b: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        let be = &self.inner;
        let op = "layer_norm";
        let (rows, cols) = (x.rows, x.cols);
        let wb = be.vector(op, w, cols)?;
        let bb = be.vector(op, b, cols)?;
        let xb = be.buf(op, x)?;
        Inner::rows_fit(op, rows)?;
        let mut out = be.output(op, rows * cols)?;
        if rows * cols > 0 {
            let cols64 = cols as u64;
            let mut l = be.stream.launch_builder(&be.k.layer_norm);
            l.arg(&mut out)
                .arg(xb)
                .arg(wb)
                .arg(bb)
                .arg(&cols64)
                .arg(&eps);
            // SAFETY: layer_norm(float* out, const float* x, const float* w, const float* b,
            // u64 cols, float eps), one block per row; `out`/`x` hold rows * cols values,
            // `w`/`b` cols values each.
            unsafe { l.launch(kernels::per_row(rows)) }.map_err(|e| device_err(op, e))?;
        }
        Ok(Inner::tensor(rows, cols, out))
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        heads: usize,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<()> {
        let be = &self.inner;
        let op = "rope";
        let hd = table.head_dim;
        if x.cols != heads * hd || positions.len() != x.rows || table.inv_freq.len() < hd / 2 {
            return Err(shape_err(
                op,
                format!(
                    "x is [{}, {}], {} positions, {heads} heads of {hd}, {} frequencies",
                    x.rows,
                    x.cols,
                    positions.len(),
                    table.inv_freq.len()
                ),
            ));
        }
        let n = x.rows * heads * (hd / 2);
        let (rows, xb) = (x.rows as u64, be.buf_mut(op, x)?);
        if n == 0 {
            return Ok(());
        }
        // [rows] positions as f32 (the CPU's `pos as f32`), then [head_dim / 2] frequencies.
        let pos_freq: Vec<f32> = positions
            .iter()
            .map(|&p| p as f32)
            .chain(table.inv_freq[..hd / 2].iter().copied())
            .collect();
        let mut last = be
            .rope_positions
            .lock()
            .map_err(|_| device_err(op, "rope position cache poisoned"))?;
        if last.as_ref().is_none_or(|(v, _)| *v != pos_freq) {
            // The replaced buffer is freed in stream order, after the launches that read it.
            let pf = be.upload(op, &pos_freq)?;
            *last = Some((pos_freq, pf));
        }
        let pf = &last.as_ref().expect("set above").1;
        let (heads64, hd64) = (heads as u64, hd as u64);
        let mut b = be.stream.launch_builder(&be.k.rope_inplace);
        b.arg(xb).arg(pf).arg(&rows).arg(&heads64).arg(&hd64);
        // SAFETY: rope_inplace(float* x, const float* pos_freq, u64 rows, u64 heads,
        // u64 head_dim); `x` holds rows * heads * head_dim values, `pos_freq` rows + head_dim / 2.
        unsafe { b.launch(kernels::elementwise(n)) }.map_err(|e| device_err(op, e))?;
        Ok(())
    }

    fn swiglu(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        let be = &self.inner;
        let op = "swiglu";
        let n = gate.rows * gate.cols;
        check_len(op, "up", up.rows * up.cols, n)?;
        let (gb, ub) = (be.buf(op, gate)?, be.buf(op, up)?);
        let mut out = be.output(op, n)?;
        let mut produced = linear::ProducedOperands::alloc(be, gate.rows, n)?;
        if n > 0 {
            let n64 = n as u64;
            let null = 0u64;
            let f = match &produced {
                None => &be.k.swiglu,
                Some(p) => p.pick(&be.k.swiglu_ops_f16, &be.k.swiglu_ops_bf16),
            };
            let mut b = be.stream.launch_builder(f);
            b.arg(&mut out);
            if let Some(p) = produced.as_mut() {
                p.push_args(&mut b, &null);
            }
            b.arg(gb).arg(ub).arg(&n64);
            // SAFETY: swiglu(float* out, const float* gate, const float* up, u64 n), or
            // swiglu_ops_{f16,bf16}(float* out, T* hi, T* lo, <the same>) with hi (and lo, or
            // null) of `produced`'s dtype; every buffer holds n values.
            unsafe { b.launch(kernels::elementwise(n)) }.map_err(|e| device_err(op, e))?;
        }
        let mut t = Inner::tensor(gate.rows, gate.cols, out);
        if let Some(p) = produced {
            t.operands = p.into_cache();
        }
        Ok(t)
    }

    fn relu_inplace(&self, x: &mut CudaTensor) -> Result<()> {
        let be = &self.inner;
        let n = x.rows * x.cols;
        be.check("relu")?;
        be.buf_mut("relu", x).and_then(|xb| {
            if n == 0 {
                return Ok(());
            }
            let n64 = n as u64;
            let mut b = be.stream.launch_builder(&be.k.relu_inplace);
            b.arg(xb).arg(&n64);
            // SAFETY: relu_inplace(float* x, u64 n); `x` holds n values.
            unsafe { b.launch(kernels::elementwise(n)) }
                .map(drop)
                .map_err(|e| device_err("relu", e))
        })
    }

    fn add_inplace(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        let be = &self.inner;
        let op = "add";
        let n = x.rows * x.cols;
        check_len(op, "y", y.rows * y.cols, n)?;
        let yb = be.buf(op, y)?;
        let xb = be.buf_mut(op, x)?;
        if n > 0 {
            let n64 = n as u64;
            let mut b = be.stream.launch_builder(&be.k.add_inplace);
            b.arg(xb).arg(yb).arg(&n64);
            // SAFETY: add_inplace(float* x, const float* y, u64 n); both hold n values.
            unsafe { b.launch(kernels::elementwise(n)) }.map_err(|e| device_err(op, e))?;
        }
        Ok(())
    }

    fn softmax_inplace(&self, x: &mut CudaTensor) -> Result<()> {
        let be = &self.inner;
        let (rows, cols) = (x.rows, x.cols);
        be.check("softmax")?;
        Inner::rows_fit("softmax", rows)
            .and_then(|()| be.buf_mut("softmax", x))
            .and_then(|xb| {
                if rows * cols == 0 {
                    return Ok(());
                }
                let cols64 = cols as u64;
                let mut b = be.stream.launch_builder(&be.k.softmax_inplace);
                b.arg(xb).arg(&cols64);
                // SAFETY: softmax_inplace(float* x, u64 cols), one block per row; `x` holds
                // rows * cols values.
                unsafe { b.launch(kernels::per_row(rows)) }
                    .map(drop)
                    .map_err(|e| device_err("softmax", e))
            })
    }

    fn argmax_rows(&self, x: &CudaTensor) -> Result<Vec<u32>> {
        self.argmax_device(x)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let be = &self.inner;
        let op = "gather_rows";
        let ids = rows
            .iter()
            .map(|&r| {
                if r >= x.rows {
                    return Err(shape_err(op, format!("row {r} of {}", x.rows)));
                }
                u32::try_from(r).map_err(|_| shape_err(op, format!("row {r} exceeds u32")))
            })
            .collect::<Result<Vec<u32>>>()?;
        let xb = be.buf(op, x)?;
        be.gather(op, &be.k.embedding_f32, xb, &ids, x.cols)
    }
}
