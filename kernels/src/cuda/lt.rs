//! cuBLASLt for the f16/bf16 tensor-core GEMMs of `linear`, autotuned per problem. The layout is
//! `linear.rs`'s: `O (n × m) = Wᵀ · X` column-major, A = `w` as a `k × n` matrix with op T,
//! B = the activation's operands (`k × m`), C = D = `out` (`n × m`, f32). The default;
//! `STRATA_GEMM=gemmex` (or `CudaBackend::set_gemm_backend`) runs every GEMM on GemmEx instead.
//!
//! - **State** ([`LtGemm`], one per backend): a cuBLASLt handle, a 32 MiB workspace (NVIDIA's
//!   recommendation for Hopper) and the tuned algorithms, all behind one mutex, so the backend
//!   makes one cuBLASLt call at a time. Made the first time cuBLASLt is selected (or asked
//!   about); when libcublasLt does not load, or the handle or workspace cannot be made, the
//!   backend runs cuBLAS GemmEx and `CudaBackend::lt_unavailable` says why.
//! - **Up to [`UNTUNED_MAX_ROWS`] rows** (decode): the heuristic's first pick for the problem's
//!   descriptors, split-K allowed, untimed, both made once per problem and kept in memory (not
//!   in the record: the heuristic gives every process the same pick). A decode step's GEMMs are
//!   bound by reading their weights, where timing back-to-back runs would time the L2 cache (see
//!   [`LT_MIN_ROWS`]); what cuBLASLt saves there is host time: GemmEx builds its descriptors and
//!   asks its heuristic on every call. Between the two, GemmEx (see [`UNTUNED_MAX_ROWS`]).
//! - **Autotuning**, for GEMMs of at least [`LT_MIN_ROWS`] rows.
//!   The first GEMM of each `TuneKey` (m, n, k, dtype, precision mode, and the
//!   operands' alignments) asks `cublasLtMatmulAlgoGetHeuristic` for up to [`CANDIDATES`]
//!   algorithms that fit the workspace and the alignments, runs each on the real operands (the
//!   mode's whole pass sequence: one GEMM for `Rounded`, two for `Split`) once untimed and
//!   [`TIMED_RUNS`] times between CUDA events, then cuBLAS GemmEx the same way, and keeps the
//!   fastest of them all (GemmEx's own heuristic wins some shapes); that GEMM then runs with it,
//!   as every later one of the key does. The first call therefore waits for the device and costs
//!   about 36 calls' time (9 candidates × 4 runs). The choice is kept in the machine's record
//!   (`gemm_record.rs`): every backend of the process and every later process restores it
//!   instead of timing (`CudaBackend::gemm_tunings` lists them, saying which were restored).
//!   Timing runs write `out` before the real passes overwrite it (the first pass has β = 0), so
//!   the result is the chosen algorithm's.
//!   Algorithms with a split-K reduction are not offered (see `heuristic`).
//! - **Fallback to GemmEx**, per key and remembered: when it timed fastest; when a
//!   half-precision operand is less than 16-byte aligned (its address, or its leading dimension
//!   `k`: `k` not a multiple of 8; every Llama-type shape is aligned, and for the others
//!   cuBLASLt offers only the low-alignment kernels GemmEx itself would pick); when the
//!   heuristic returns no algorithm; when no candidate launches. The f32 output may have any
//!   `n`: its true alignment is passed to the heuristic, which then offers only algorithms that
//!   accept it.
//! - **Results**: the same types as GemmEx (f16/bf16 A and B, f32 compute, scale, C and D), so
//!   `Split` and `Rounded` keep their error bounds. The bits can differ from GemmEx's (another
//!   kernel, another summation order), never between two calls of one key.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::cublas::sys::{cublasOperation_t, cudaDataType_t as BlasType};
use cudarc::cublaslt::result::{self as ltr, CublasError};
use cudarc::cublaslt::sys as lts;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

use super::gemm_record::{self, Recorded, TuningRecord};
use super::{DeviceInfo, GemmPrecision, device_err};
use crate::{DType, Result};

const OP: &str = "linear";
/// The workspace cuBLASLt may use, allocated once per backend.
pub const WORKSPACE_BYTES: usize = 32 << 20;
/// Algorithms asked of the heuristic and timed, per key.
pub const CANDIDATES: usize = 8;
/// Timed runs per candidate, after one untimed.
pub const TIMED_RUNS: usize = 3;
/// Rows from which a GEMM is tuned (fewer run on GemmEx or, up to [`UNTUNED_MAX_ROWS`], on the
/// heuristic's first pick). Below this a GEMM is bound by reading its weight, and the tuning's
/// back-to-back runs on one weight (up to 50 MiB, in L2 after the first) time the wrong thing:
/// on an H100 the algorithms they picked for 16-row decode GEMMs made a Llama-3-8B decode step
/// twice as slow as GemmEx.
pub const LT_MIN_ROWS: usize = 512;
/// Rows up to which a GEMM runs on cuBLASLt's heuristic pick, untimed; from here to
/// [`LT_MIN_ROWS`] GemmEx runs it. On an H100 the pick at 16 rows was GemmEx's own kernels
/// (Llama-3-8B, 16 sequences: the same kernels and device time, the step 14.0 -> 11.3 ms from
/// host time alone), while at 64 rows it made the decode step 10% slower than GemmEx's choice
/// (20.6 against 18.4-18.8 ms).
pub const UNTUNED_MAX_ROWS: usize = 16;
/// The alignment (bytes) both half-precision operands need for the Lt path.
const MIN_OPERAND_ALIGN: u32 = 16;

/// Which library runs the f16/bf16 GEMMs of `linear` (more than 8 rows).
///
/// cuBLASLt autotuned is the default: on an H100 it keeps every Llama-3-8B projection at or
/// above 0.90× PyTorch's `matmul`, where GemmEx fell to 0.85× on some. Its cost, ~36 GEMMs of
/// timing on a shape's first call, is paid once per machine: the outcome is recorded on disk and
/// restored by later runs, which also makes every run on the machine use the same algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GemmBackend {
    /// cuBLASLt, with the algorithm autotuned per problem of at least [`LT_MIN_ROWS`] rows
    /// against GemmEx, the heuristic's first pick up to [`UNTUNED_MAX_ROWS`] rows, GemmEx between
    /// (see the module header of `lt.rs`).
    #[default]
    LtAutotuned,
    /// cuBLAS `cublasGemmEx` with `CUBLAS_GEMM_DEFAULT`: the library's own choice, untimed.
    GemmEx,
}

impl GemmBackend {
    /// The environment variable a new backend reads: unset or `lt` selects
    /// [`GemmBackend::LtAutotuned`]; `gemmex`, [`GemmBackend::GemmEx`] (an unknown value gives
    /// the default: the CLI refuses one before it opens the GPU, see [`Self::check_env`]).
    pub const ENV: &'static str = "STRATA_GEMM";

    /// `lt` or `gemmex` (any case, spaces around ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lt" => Some(GemmBackend::LtAutotuned),
            "gemmex" => Some(GemmBackend::GemmEx),
            _ => None,
        }
    }

    /// The backend [`Self::ENV`] selects.
    pub fn from_env() -> Self {
        std::env::var(Self::ENV)
            .ok()
            .and_then(|v| Self::parse(&v))
            .unwrap_or_default()
    }

    /// An error naming [`Self::ENV`] when it is set to something other than `lt` or `gemmex`.
    pub fn check_env() -> std::result::Result<(), String> {
        match std::env::var(Self::ENV) {
            Ok(v) if Self::parse(&v).is_none() => Err(format!(
                "{}={v:?}: expected `lt` (the default) or `gemmex`",
                Self::ENV
            )),
            _ => Ok(()),
        }
    }

    /// `lt` or `gemmex`, as [`Self::ENV`] spells them.
    pub fn name(self) -> &'static str {
        match self {
            GemmBackend::LtAutotuned => "lt",
            GemmBackend::GemmEx => "gemmex",
        }
    }

    pub(super) fn to_u8(self) -> u8 {
        match self {
            GemmBackend::LtAutotuned => 0,
            GemmBackend::GemmEx => 1,
        }
    }

    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            1 => GemmBackend::GemmEx,
            _ => GemmBackend::LtAutotuned,
        }
    }
}

impl std::fmt::Display for GemmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GemmBackend::LtAutotuned => "cuBLASLt, autotuned per shape",
            GemmBackend::GemmEx => "cuBLAS GemmEx",
        })
    }
}

/// What the autotuner chose for one problem.
#[derive(Clone, Debug, PartialEq)]
pub enum GemmChoice {
    /// cuBLASLt with the heuristic's `rank`-th algorithm (0: its first pick) of the `candidates`
    /// it returned; `ms` per call as timed, `first_ms` the heuristic's first pick's time (`None`
    /// when that one did not launch).
    Lt {
        rank: usize,
        candidates: usize,
        ms: f64,
        first_ms: Option<f64>,
    },
    /// cuBLAS GemmEx, and why.
    GemmEx(LtFallback),
}

/// Why a problem runs on GemmEx with cuBLASLt selected.
#[derive(Clone, Debug, PartialEq)]
pub enum LtFallback {
    /// A half-precision operand is less than 16-byte aligned (`k` not a multiple of 8, or its
    /// address).
    Unaligned,
    /// cuBLASLt offered no algorithm, or none launched; the detail says which.
    NoAlgorithm(String),
    /// GemmEx ran faster than cuBLASLt's fastest algorithm (ms per call of each, as timed).
    Faster { gemm_ex_ms: f64, lt_ms: f64 },
}

impl std::fmt::Display for GemmChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GemmChoice::Lt {
                rank, candidates, ..
            } => write!(f, "cuBLASLt algorithm {} of {candidates}", rank + 1),
            GemmChoice::GemmEx(LtFallback::Unaligned) => f.write_str("GemmEx (unaligned)"),
            GemmChoice::GemmEx(LtFallback::NoAlgorithm(why)) => write!(f, "GemmEx ({why})"),
            GemmChoice::GemmEx(LtFallback::Faster { gemm_ex_ms, lt_ms }) => write!(
                f,
                "GemmEx ({:.3} ms, cuBLASLt's best {:.3} ms)",
                gemm_ex_ms, lt_ms
            ),
        }
    }
}

/// One autotuned problem of a backend (see [`GemmChoice`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmTuning {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
    pub precision: GemmPrecision,
    pub choice: GemmChoice,
    /// Taken from the machine's record (timed by an earlier process, or by another backend of
    /// this one), not timed by this backend.
    pub recorded: bool,
}

/// The machine's GEMM tuning record, for `strata info` (see `gemm_record.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmRecordInfo {
    /// The file, or `None` when kept in memory only.
    pub path: Option<PathBuf>,
    /// Problems it holds now.
    pub entries: usize,
    /// Problems read from the file when it was opened.
    pub loaded: usize,
    /// Why the file was not used or could not be written, if so.
    pub problem: Option<String>,
}

/// The half-precision type of a GEMM's A and B.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum HalfType {
    F16,
    BF16,
}

impl HalfType {
    pub(super) fn cublas(self) -> BlasType {
        match self {
            HalfType::F16 => BlasType::CUDA_R_16F,
            HalfType::BF16 => BlasType::CUDA_R_16BF,
        }
    }

    fn lt(self) -> lts::cudaDataType_t {
        match self {
            HalfType::F16 => lts::cudaDataType_t::CUDA_R_16F,
            HalfType::BF16 => lts::cudaDataType_t::CUDA_R_16BF,
        }
    }

    fn dtype(self) -> DType {
        match self {
            HalfType::F16 => DType::F16,
            HalfType::BF16 => DType::BF16,
        }
    }
}

/// One half-precision GEMM call: the problem and the device addresses of its operands.
pub(super) struct HalfGemm<'p> {
    /// Rows of the activation and output.
    pub m: usize,
    /// Output features (rows of `w`).
    pub n: usize,
    /// Input features.
    pub k: usize,
    pub dtype: HalfType,
    pub precision: GemmPrecision,
    /// `w: [n, k]` in `dtype`.
    pub w: u64,
    /// `(B, β)` per pass: the activation operand (`[m, k]` in `dtype`) and the scale of the
    /// output already there (0 for the first pass).
    pub passes: &'p [(u64, f32)],
    /// `out: [m, n]` f32.
    pub out: u64,
}

/// The autotuner's cache key: a problem and its operands' alignments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct TuneKey {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: HalfType,
    pub precision: GemmPrecision,
    /// Bytes, at most 256: A (`w`), B (every pass's operand), C = D (`out`).
    pub align: [u32; 3],
}

impl TuneKey {
    fn new(g: &HalfGemm) -> Self {
        let half_ld = g.k * 2;
        let b = g
            .passes
            .iter()
            .map(|&(p, _)| align_bytes(p, half_ld))
            .min()
            .unwrap_or(1);
        TuneKey {
            m: g.m,
            n: g.n,
            k: g.k,
            dtype: g.dtype,
            precision: g.precision,
            align: [align_bytes(g.w, half_ld), b, align_bytes(g.out, g.n * 4)],
        }
    }

    fn lt_can_run(&self) -> bool {
        self.align[0] >= MIN_OPERAND_ALIGN && self.align[1] >= MIN_OPERAND_ALIGN
    }
}

/// The alignment every column of a matrix at `ptr` with columns `ld_bytes` apart keeps: the
/// largest power of two dividing both, at most 256 (cuBLASLt's default assumption).
fn align_bytes(ptr: u64, ld_bytes: usize) -> u32 {
    1 << (ptr | ld_bytes as u64 | 256).trailing_zeros()
}

/// The tuned algorithm of a key with its descriptors, made once (`None`: GemmEx), how it was
/// chosen, and whether it came from the machine's record rather than timing here.
struct Tuned {
    lt: Option<(Problem, lts::cublasLtMatmulAlgo_t)>,
    choice: GemmChoice,
    recorded: bool,
}

impl Tuned {
    fn gemm_ex(why: LtFallback) -> Self {
        Tuned {
            lt: None,
            choice: GemmChoice::GemmEx(why),
            recorded: false,
        }
    }

    /// The outcome to keep in the record: only what was timed.
    fn to_record(&self) -> Option<Recorded> {
        match (&self.choice, &self.lt) {
            (
                &GemmChoice::Lt {
                    rank,
                    candidates,
                    ms,
                    first_ms,
                },
                Some((_, algo)),
            ) => Some(Recorded::Lt {
                rank,
                candidates,
                ms,
                first_ms,
                algo: algo.data,
            }),
            (&GemmChoice::GemmEx(LtFallback::Faster { gemm_ex_ms, lt_ms }), _) => {
                Some(Recorded::GemmEx { gemm_ex_ms, lt_ms })
            }
            _ => None,
        }
    }
}

/// cuBLASLt for one backend (see the module header).
pub(super) struct LtGemm {
    state: Mutex<LtState>,
    /// Nanoseconds spent timing candidates (see [`LtGemm::tuning_seconds`]).
    tuning_ns: AtomicU64,
}

struct LtState {
    handle: Handle,
    /// [`WORKSPACE_BYTES`] bytes on the backend's stream.
    workspace: CudaSlice<u8>,
    tuned: HashMap<TuneKey, Tuned>,
    /// Problems of at most [`UNTUNED_MAX_ROWS`] rows: the heuristic's first pick, split-K
    /// allowed, made ready once (`None`: cuBLASLt cannot run it; GemmEx does).
    untuned: HashMap<TuneKey, Option<(Problem, lts::cublasLtMatmulAlgo_t)>>,
    /// The machine's record, shared with every backend of this process on the same device
    /// (`gemm_record.rs`).
    record: Arc<Mutex<TuningRecord>>,
}

impl LtGemm {
    /// The handle, workspace and the machine's tuning record (kept in `record_dir`, or in
    /// memory only when `None`), or why cuBLASLt cannot be used (never panics).
    pub(super) fn new(
        stream: &Arc<CudaStream>,
        device: &DeviceInfo,
        record_dir: Option<PathBuf>,
    ) -> std::result::Result<Self, String> {
        // SAFETY: `is_culib_present` only tries to dlopen libcublasLt by name and drops it.
        if !unsafe { lts::is_culib_present() } {
            return Err("cuBLASLt not found (libcublasLt.so not loadable)".into());
        }
        let made = catch_unwind(AssertUnwindSafe(
            || -> std::result::Result<LtState, String> {
                let handle =
                    Handle(ltr::create_handle().map_err(|e| format!("cublasLtCreate: {e}"))?);
                let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| {
                    format!("cuBLASLt workspace ({} MiB): {e}", WORKSPACE_BYTES >> 20)
                })?;
                // SAFETY: both take no arguments and return the loaded library's versions.
                let versions =
                    unsafe { (lts::cublasLtGetVersion(), lts::cublasLtGetCudartVersion()) };
                let machine = gemm_record::machine(
                    &device.name,
                    device.compute_capability,
                    versions.0,
                    versions.1,
                );
                Ok(LtState {
                    handle,
                    workspace,
                    tuned: HashMap::new(),
                    untuned: HashMap::new(),
                    record: gemm_record::shared(record_dir, machine),
                })
            },
        ));
        match made {
            Ok(state) => state.map(|s| LtGemm {
                state: Mutex::new(s),
                tuning_ns: AtomicU64::new(0),
            }),
            Err(p) => Err(format!(
                "cuBLASLt: the bindings panicked: {}",
                super::device::panic_message(p.as_ref())
            )),
        }
    }

    /// Runs `g` on cuBLASLt with its key's tuned algorithm (tuning it on first use, against
    /// `gemm_ex`, which runs `g`'s passes on GemmEx): `true` when done, `false` when the caller
    /// must run it on GemmEx (nothing of it was left half done that GemmEx's β = 0 first pass
    /// does not overwrite).
    pub(super) fn matmul(
        &self,
        stream: &CudaStream,
        g: &HalfGemm,
        gemm_ex: &dyn Fn() -> Result<()>,
    ) -> Result<bool> {
        if g.m <= UNTUNED_MAX_ROWS {
            return self.matmul_untuned(stream, g);
        }
        if g.m < LT_MIN_ROWS {
            return Ok(false);
        }
        let key = TuneKey::new(g);
        let mut st = self
            .state
            .lock()
            .map_err(|_| device_err(OP, "the cuBLASLt state was poisoned by a panic"))?;
        if !key.lt_can_run() {
            st.tuned
                .entry(key)
                .or_insert_with(|| Tuned::gemm_ex(LtFallback::Unaligned));
            return Ok(false);
        }
        if !st.tuned.contains_key(&key) {
            // Held while timing: another backend of this process waits, then restores what
            // this one timed, and no two time on the GPU at once.
            let record = st.record.clone();
            let mut record = record.lock().unwrap_or_else(|p| p.into_inner());
            let restored = record.get(&key).and_then(|r| st.restore(&key, r));
            let t = match restored {
                Some(t) => t,
                None => {
                    // The work already queued is the caller's, not the tuning's: it runs first,
                    // outside the clock.
                    stream.synchronize().map_err(|e| device_err(OP, e))?;
                    let t0 = Instant::now();
                    let t = st.tune(&key, stream, g, gemm_ex)?;
                    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    self.tuning_ns.fetch_add(ns, Ordering::Relaxed);
                    if let Some(r) = t.to_record() {
                        record.insert(key, r);
                    }
                    t
                }
            };
            st.tuned.insert(key, t);
        }
        let LtState {
            handle,
            workspace,
            tuned,
            ..
        } = &mut *st;
        let Some((problem, algo)) = tuned.get(&key).and_then(|t| t.lt.as_ref()) else {
            return Ok(false);
        };
        match run(handle, workspace, problem, algo, stream, g) {
            Ok(()) => Ok(true),
            Err(e) => {
                // A synchronous refusal: nothing launched past the failing pass. Remember it.
                let why = LtFallback::NoAlgorithm(format!("cublasLtMatmul: {e}"));
                tuned.insert(key, Tuned::gemm_ex(why));
                Ok(false)
            }
        }
    }

    /// Runs `g` (at most [`UNTUNED_MAX_ROWS`] rows) on cuBLASLt with the heuristic's first pick
    /// for its descriptors, split-K allowed, untimed (see [`LT_MIN_ROWS`]); `false` when the
    /// caller must run it on GemmEx. The descriptors and the pick are made once per problem: a
    /// decode step's GEMMs are bound by their weights' bytes, and GemmEx, which makes its own
    /// for every call, cost 12-40 µs of host time per 16-row projection on an H100's host, more
    /// than the device spends on the small ones.
    fn matmul_untuned(&self, stream: &CudaStream, g: &HalfGemm) -> Result<bool> {
        let key = TuneKey::new(g);
        let mut st = self
            .state
            .lock()
            .map_err(|_| device_err(OP, "the cuBLASLt state was poisoned by a panic"))?;
        if !key.lt_can_run() {
            return Ok(false);
        }
        if !st.untuned.contains_key(&key) {
            let ready = Problem::new(&key).ok().and_then(|p| {
                let first = st.heuristic(&key, &p, true).ok()?.into_iter().next()?;
                Some((p, first))
            });
            st.untuned.insert(key, ready);
        }
        let LtState {
            handle,
            workspace,
            untuned,
            ..
        } = &mut *st;
        let Some(Some((problem, algo))) = untuned.get(&key) else {
            return Ok(false);
        };
        match run(handle, workspace, problem, algo, stream, g) {
            Ok(()) => Ok(true),
            Err(_) => {
                // A synchronous refusal, nothing launched past the failing pass: GemmEx from now.
                untuned.insert(key, None);
                Ok(false)
            }
        }
    }

    /// Seconds this backend has spent timing candidate algorithms (problems restored from the
    /// record cost none). The host waits for the device through all of it, so a caller timing
    /// its own work takes this out to leave what the work would cost on a tuned machine.
    pub(super) fn tuning_seconds(&self) -> f64 {
        self.tuning_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Every problem tuned so far, ordered by (n, k, m).
    pub(super) fn tunings(&self) -> Vec<GemmTuning> {
        let Ok(st) = self.state.lock() else {
            return Vec::new();
        };
        let mut v: Vec<GemmTuning> = st
            .tuned
            .iter()
            .map(|(key, t)| GemmTuning {
                m: key.m,
                n: key.n,
                k: key.k,
                dtype: key.dtype.dtype(),
                precision: key.precision,
                choice: t.choice.clone(),
                recorded: t.recorded,
            })
            .collect();
        v.sort_by_key(|t| (t.n, t.k, t.m, t.precision.to_u8(), t.dtype.name()));
        v
    }

    /// Where the machine's record is kept, what it holds and whether it could be used.
    pub(super) fn record_info(&self) -> Option<GemmRecordInfo> {
        let st = self.state.lock().ok()?;
        let r = st.record.lock().ok()?;
        Some(GemmRecordInfo {
            path: r.path().map(Path::to_path_buf),
            entries: r.len(),
            loaded: r.loaded(),
            problem: r.problem().map(str::to_string),
        })
    }
}

impl LtState {
    /// `key`'s outcome as the record keeps it, made ready to run; `None` (time it again) when
    /// cuBLASLt no longer accepts the recorded algorithm for these descriptors.
    fn restore(&self, key: &TuneKey, r: Recorded) -> Option<Tuned> {
        let (rank, candidates, ms, first_ms, data) = match r {
            Recorded::GemmEx { gemm_ex_ms, lt_ms } => {
                return Some(Tuned {
                    recorded: true,
                    ..Tuned::gemm_ex(LtFallback::Faster { gemm_ex_ms, lt_ms })
                });
            }
            Recorded::Lt {
                rank,
                candidates,
                ms,
                first_ms,
                algo,
            } => (rank, candidates, ms, first_ms, algo),
        };
        let p = Problem::new(key).ok()?;
        let algo = lts::cublasLtMatmulAlgo_t { data };
        let mut check = unfilled_result(algo);
        // SAFETY: the handle and `p`'s descriptors are live; `algo` and `check` are locals the
        // call reads and writes during the call.
        let status = unsafe {
            lts::cublasLtMatmulAlgoCheck(
                self.handle.0,
                p.desc.0,
                p.a.0,
                p.b.0,
                p.c.0,
                p.c.0,
                &algo,
                &mut check,
            )
        };
        let fits = status == lts::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && check.workspaceSize <= WORKSPACE_BYTES;
        fits.then(|| Tuned {
            lt: Some((p, algo)),
            choice: GemmChoice::Lt {
                rank,
                candidates,
                ms,
                first_ms,
            },
            recorded: true,
        })
    }

    /// Times the heuristic's candidates and `gemm_ex` on `g`'s operands and picks the fastest
    /// (see the module header). Device errors around the timing (events) are errors; a
    /// candidate cuBLASLt refuses is skipped.
    fn tune(
        &mut self,
        key: &TuneKey,
        stream: &CudaStream,
        g: &HalfGemm,
        gemm_ex: &dyn Fn() -> Result<()>,
    ) -> Result<Tuned> {
        let found = match Problem::new(key).and_then(|p| {
            let found = self.heuristic(key, &p, false)?;
            Ok((p, found))
        }) {
            Ok((p, found)) if !found.is_empty() => (p, found),
            Ok(_) => {
                let why = "the heuristic returned no algorithm".to_string();
                return Ok(Tuned::gemm_ex(LtFallback::NoAlgorithm(why)));
            }
            Err(e) => {
                let why = format!("cublasLtMatmulAlgoGetHeuristic: {e}");
                return Ok(Tuned::gemm_ex(LtFallback::NoAlgorithm(why)));
            }
        };
        let (problem, algos) = found;
        let mut best: Option<(usize, f64)> = None;
        let mut first_ms = None;
        for (rank, algo) in algos.iter().enumerate() {
            let Some(ms) = self.time(&problem, algo, stream, g)? else {
                continue;
            };
            if rank == 0 {
                first_ms = Some(ms);
            }
            if best.is_none_or(|(_, b)| ms < b) {
                best = Some((rank, ms));
            }
        }
        if let Some((_, lt_ms)) = best {
            gemm_ex()?;
            let gemm_ex_ms = timed(stream, || {
                (0..TIMED_RUNS).try_for_each(|_| gemm_ex())?;
                Ok(true)
            })?;
            if let Some(gemm_ex_ms) = gemm_ex_ms
                && gemm_ex_ms < lt_ms
            {
                return Ok(Tuned::gemm_ex(LtFallback::Faster { gemm_ex_ms, lt_ms }));
            }
        }
        Ok(match best {
            Some((rank, ms)) => Tuned {
                lt: Some((problem, algos[rank])),
                choice: GemmChoice::Lt {
                    rank,
                    candidates: algos.len(),
                    ms,
                    first_ms,
                },
                recorded: false,
            },
            None => Tuned::gemm_ex(LtFallback::NoAlgorithm(format!(
                "none of the heuristic's {} algorithms launched",
                algos.len()
            ))),
        })
    }

    /// Up to [`CANDIDATES`] algorithms for `p`, best first by the heuristic's estimate, each
    /// fitting the workspace and the operands' alignments.
    fn heuristic(
        &self,
        key: &TuneKey,
        p: &Problem,
        split_k: bool,
    ) -> std::result::Result<Vec<lts::cublasLtMatmulAlgo_t>, CublasError> {
        use lts::cublasLtMatmulPreferenceAttributes_t as Attr;
        let pref = Pref(ltr::create_matmul_pref()?);
        let workspace = WORKSPACE_BYTES as u64;
        // SAFETY: `pref` is live; MAX_WORKSPACE_BYTES takes a uint64_t, read from the local
        // during the call.
        unsafe {
            ltr::set_matmul_pref_attribute(
                pref.0,
                Attr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const u64).cast::<c_void>(),
                std::mem::size_of::<u64>(),
            )
        }?;
        let [a, b, c] = key.align;
        // No split-K for tuned problems: its reduction adds the k-slices' partial sums in an
        // order of its own, so two processes that tuned to different algorithms could round
        // differently, and the tokens of one policy must not depend on which algorithm another
        // process timed fastest. An untuned pick is the same in every process (the heuristic
        // is deterministic), and a few-row GEMM needs split-K to spread its weight over the SMs.
        let reductions = if split_k {
            lts::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_MASK as u32
        } else {
            lts::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_NONE as u32
        };
        for (attr, bytes) in [
            (Attr::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions),
            (Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a),
            (Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b),
            (Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c),
            (Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c),
        ] {
            // SAFETY: `pref` is live; the REDUCTION_SCHEME_MASK and MIN_ALIGNMENT_*_BYTES
            // attributes take a uint32_t, read from the local during the call.
            unsafe {
                ltr::set_matmul_pref_attribute(
                    pref.0,
                    attr,
                    (&bytes as *const u32).cast::<c_void>(),
                    std::mem::size_of::<u32>(),
                )
            }?;
        }
        let mut results = [unfilled_result(lts::cublasLtMatmulAlgo_t { data: [0; 8] }); CANDIDATES];
        let mut count: c_int = 0;
        // SAFETY: the handle, the descriptors and `pref` are live; `results` has room for the
        // CANDIDATES entries requested and `count` receives how many were written.
        unsafe {
            lts::cublasLtMatmulAlgoGetHeuristic(
                self.handle.0,
                p.desc.0,
                p.a.0,
                p.b.0,
                p.c.0,
                p.c.0,
                pref.0,
                CANDIDATES as c_int,
                results.as_mut_ptr(),
                &mut count,
            )
        }
        .result()?;
        let count = (count.max(0) as usize).min(CANDIDATES);
        Ok(results[..count]
            .iter()
            .filter(|r| {
                r.state == lts::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && r.workspaceSize <= WORKSPACE_BYTES
            })
            .map(|r| r.algo)
            .collect())
    }

    /// Milliseconds per call of `algo` on `g` (one untimed run, then [`TIMED_RUNS`] between
    /// events), or `None` when cuBLASLt refuses it.
    fn time(
        &mut self,
        p: &Problem,
        algo: &lts::cublasLtMatmulAlgo_t,
        stream: &CudaStream,
        g: &HalfGemm,
    ) -> Result<Option<f64>> {
        let (h, ws) = (&self.handle, &mut self.workspace);
        if run(h, ws, p, algo, stream, g).is_err() {
            return Ok(None);
        }
        timed(stream, || {
            Ok((0..TIMED_RUNS).all(|_| run(h, ws, p, algo, stream, g).is_ok()))
        })
    }
}

/// A heuristic result for cuBLASLt to fill (for `algo`), marked unsupported until it does.
fn unfilled_result(algo: lts::cublasLtMatmulAlgo_t) -> lts::cublasLtMatmulHeuristicResult_t {
    lts::cublasLtMatmulHeuristicResult_t {
        algo,
        workspaceSize: 0,
        state: lts::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
        wavesCount: 0.0,
        reserved: [0; 4],
    }
}

/// `g`'s passes with `algo`: `out = w · B₀ᵀ`, then `out += w · B₁ᵀ` for `Split`.
fn run(
    handle: &Handle,
    workspace: &mut CudaSlice<u8>,
    p: &Problem,
    algo: &lts::cublasLtMatmulAlgo_t,
    stream: &CudaStream,
    g: &HalfGemm,
) -> std::result::Result<(), CublasError> {
    let alpha = 1.0f32;
    let (ws, _ws) = workspace.device_ptr_mut(stream);
    for &(b, beta) in g.passes {
        // SAFETY: the layouts of `p` describe the buffers exactly (built from the same m,
        // n, k): A = `w`, `k × n` with ld k in `g.dtype` (n * k values); B = the pass's
        // operand, `k × m` with ld k (m * k values); C = D = `out`, `n × m` f32 with ld n
        // (m * n values), in place. `algo` came from the heuristic for these descriptors and
        // alignments, and needs at most WORKSPACE_BYTES of the workspace passed. `alpha` and
        // `beta` are f32 host scalars (host pointer mode, the default), read during the call.
        // Everything is enqueued on `stream`, the one the buffers and the workspace live on.
        unsafe {
            ltr::matmul(
                handle.0,
                p.desc.0,
                (&alpha as *const f32).cast::<c_void>(),
                (&beta as *const f32).cast::<c_void>(),
                g.w as *const c_void,
                p.a.0,
                b as *const c_void,
                p.b.0,
                g.out as *const c_void,
                p.c.0,
                g.out as *mut c_void,
                p.c.0,
                algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as lts::cudaStream_t,
            )
        }?;
    }
    Ok(())
}

/// Milliseconds per run of `runs` ([`TIMED_RUNS`] runs enqueued on `stream`, `Ok(false)` when
/// one was refused) between two events, or `None` when refused.
fn timed(stream: &CudaStream, runs: impl FnOnce() -> Result<bool>) -> Result<Option<f64>> {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let e0 = stream.record_event(flags).map_err(|e| device_err(OP, e))?;
    if !runs()? {
        return Ok(None);
    }
    let e1 = stream.record_event(flags).map_err(|e| device_err(OP, e))?;
    e1.synchronize().map_err(|e| device_err(OP, e))?;
    let ms = e0.elapsed_ms(&e1).map_err(|e| device_err(OP, e))?;
    Ok(Some(ms as f64 / TIMED_RUNS as f64))
}

/// A cuBLASLt handle, destroyed on drop.
struct Handle(lts::cublasLtHandle_t);

// SAFETY: the handle points at the library's context, which is not tied to the thread that made
// it; `LtGemm` uses it only under its mutex, from one thread at a time.
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: made by `create_handle`, destroyed only here, never used afterwards.
        let _ = unsafe { ltr::destroy_handle(self.0) };
    }
}

/// The descriptors of one problem: f32 compute and scale with op(A) = T, and the A, B and C (= D)
/// layouts. Made once per tuned key and kept with its algorithm, so a call makes none.
struct Problem {
    desc: MatmulDesc,
    a: Layout,
    b: Layout,
    c: Layout,
}

// SAFETY: the descriptors are plain host-side structures the library allocated, not tied to the
// thread that made them; they live in `LtState`, used only under its mutex, one thread at a time.
unsafe impl Send for Problem {}

impl Problem {
    fn new(key: &TuneKey) -> std::result::Result<Self, CublasError> {
        let desc = MatmulDesc(ltr::create_matmul_desc(
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lts::cudaDataType_t::CUDA_R_32F,
        )?);
        let transa = cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: `desc` is live; TRANSA takes an int32_t (a cublasOperation_t), read from the
        // local during the call.
        unsafe {
            ltr::set_matmul_desc_attribute(
                desc.0,
                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transa as *const i32).cast::<c_void>(),
                std::mem::size_of::<i32>(),
            )
        }?;
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let half = key.dtype.lt();
        Ok(Problem {
            desc,
            a: Layout::new(half, k, n, k)?,
            b: Layout::new(half, k, m, k)?,
            c: Layout::new(lts::cudaDataType_t::CUDA_R_32F, n, m, n)?,
        })
    }
}

struct MatmulDesc(lts::cublasLtMatmulDesc_t);

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: made by `create_matmul_desc`, destroyed only here.
        let _ = unsafe { ltr::destroy_matmul_desc(self.0) };
    }
}

/// A column-major matrix layout: `rows × cols` of `dtype`, columns `ld` elements apart.
struct Layout(lts::cublasLtMatrixLayout_t);

impl Layout {
    fn new(
        dtype: lts::cudaDataType_t,
        rows: u64,
        cols: u64,
        ld: u64,
    ) -> std::result::Result<Self, CublasError> {
        // `ld` fits: every dimension was checked against i32 by the caller (`Dims::new`).
        ltr::create_matrix_layout(dtype, rows, cols, ld as i64).map(Layout)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: made by `create_matrix_layout`, destroyed only here.
        let _ = unsafe { ltr::destroy_matrix_layout(self.0) };
    }
}

struct Pref(lts::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: made by `create_matmul_pref`, destroyed only here.
        let _ = unsafe { ltr::destroy_matmul_pref(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_of_address_and_leading_dimension() {
        assert_eq!(align_bytes(0x7f00_0000_0000, 8192), 256);
        assert_eq!(align_bytes(0x7f00_0000_0000, 4096 * 2), 256);
        assert_eq!(align_bytes(0x7f00_0000_0000, 100 * 2), 8);
        assert_eq!(align_bytes(0x7f00_0000_0010, 8192), 16);
        assert_eq!(align_bytes(0x7f00_0000_0000, 257 * 4), 4);
        let key = |k: usize, w: u64| {
            TuneKey::new(&HalfGemm {
                m: 33,
                n: 257,
                k,
                dtype: HalfType::BF16,
                precision: GemmPrecision::Split,
                w,
                passes: &[(0x1000_0000, 0.0), (0x2000_0000, 1.0)],
                out: 0x3000_0000,
            })
        };
        assert!(key(96, 0x4000_0000).lt_can_run());
        assert_eq!(key(96, 0x4000_0000).align, [64, 64, 4]);
        assert_eq!(key(4096, 0x4000_0000).align, [256, 256, 4]);
        assert!(!key(255, 0x4000_0000).lt_can_run(), "k odd");
        assert!(
            !key(100, 0x4000_0000).lt_can_run(),
            "k a multiple of 4, not 8"
        );
        assert!(!key(96, 0x4000_0008).lt_can_run(), "w 8-byte aligned");
    }

    #[test]
    fn backend_names_round_trip() {
        for b in [GemmBackend::LtAutotuned, GemmBackend::GemmEx] {
            assert_eq!(GemmBackend::from_u8(b.to_u8()), b);
        }
        assert_eq!(GemmBackend::default(), GemmBackend::LtAutotuned);
        for b in [GemmBackend::LtAutotuned, GemmBackend::GemmEx] {
            assert_eq!(GemmBackend::parse(b.name()), Some(b));
        }
        assert_eq!(GemmBackend::parse(" GemmEx "), Some(GemmBackend::GemmEx));
        assert_eq!(GemmBackend::parse("cublas"), None);
        assert_eq!(GemmBackend::parse(""), None);
    }
}
