//! Paged decode attention on the GPU, split along the KV (flash-decoding), and the exact merge of
//! partials — the GPU tier of "attention where the data lives" (DESIGN.md).
//!
//! - **Pool.** A [`KvPool`] is one device buffer of `n_blocks` blocks, each
//!   `[2 (K, V), kv_heads, block_tokens, head_dim]` contiguous, in f32, f16 or bf16 (f16 is the
//!   production case; the math is f32 whatever the storage).
//! - **Tables.** [`DeviceBlockTables`]: per sequence, its block ids in position order
//!   (`[batch, max_blocks] u32`, padded) and its length (`[batch] u32`), checked at upload.
//! - **Decode.** [`CudaBackend::decode_attention`] attends one query per sequence
//!   (`q: [batch, n_heads * head_dim] f32`) over all of that sequence's tokens and returns a
//!   [`DevicePartial`] (`o: [batch, n_heads * head_dim]`, `lse: [batch, n_heads]`, natural log,
//!   `-inf` with `o = 0` for an empty sequence) — the contract of [`crate::attention::Partial`].
//!   Kernel 1 gives each CTA one (sequence, KV head, split) and every query head of that GQA
//!   group (KV read once per group); the number of splits is chosen so that even batch 1 fills
//!   every SM. With several splits, the last CTA of each (sequence, head group) to finish merges
//!   that group's splits in the same launch: one launch per call, no merge kernel.
//! - **Per-call cost.** A call enqueues one launch and two allocations (the returned `o` and
//!   `lse`). The split partials and the arrival counters live in a scratch buffer owned by the
//!   backend and reused by every call; the occupancy that sizes the splits is queried once per
//!   kernel.
//! - **Specialisation.** head_dim 64 and 128 with 16-byte loads and groups of 1, 2 or 4 query
//!   heads per CTA (larger groups take several CTAs over the same KV); any other head_dim up to
//!   256 runs a generic kernel. CTAs of 2 or 4 heads have 8 warps: half the splits of 4-warp
//!   CTAs for the same occupancy, so half the partials for the last CTA of a column to merge
//!   (bench/RESULTS.md, tenth session).
//! - **Bandwidth floors.** [`CudaBackend::copy_span_time_ms`] and [`CudaBackend::read_time_ms`]
//!   time a device-to-device copy and a pure streaming read of a given size, for the bench to
//!   compare the decode with.
//! - **Merge.** [`CudaBackend::merge_partials`] merges partials from different tiers (a GPU
//!   partial, a host partial uploaded with [`CudaBackend::tensor`], ...) with the formula of
//!   `Partial::merge`.

use cudarc::driver::sys::{self, CUevent_flags};
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use half::{bf16, f16};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::{CudaBackend, CudaTensor, Inner, check_len, device_err};
use crate::{AttentionGeometry, DType, KernelError, KvSlice, Result, shape_err};

/// Warps per CTA of the specialised decode kernels, by query heads per CTA as `GROUP_SIZES` (the
/// `WARPS` of each `ATTN_FAST` in attention.cu), and of the generic kernel (`ATTN_WARPS`).
const FAST_WARPS: [u32; 3] = [4, 8, 8];
const GENERIC_WARPS: u32 = 4;
/// head_dim at most for the generic kernel; `ATTN_GENERIC_MAX_DIM` in attention.cu.
const GENERIC_MAX_DIM: usize = 256;
/// Query heads per CTA of each specialised kernel; the generic kernel takes 8.
const GROUP_SIZES: [usize; 3] = [1, 2, 4];
/// The most query heads a specialised CTA takes; larger groups take several CTAs.
const MAX_FAST_GROUP: usize = GROUP_SIZES[GROUP_SIZES.len() - 1];
const FAST_DIMS: [usize; 2] = [64, 128];
/// A split covers at least this many tokens.
const MIN_SPLIT_TOKENS: usize = 64;
/// Splits are whole runs of this many tokens (`ATTN_SPLIT_TOKENS` in attention.cu).
const SPLIT_TOKENS: usize = 16;
/// A wave of CTAs' fixed cost (start, the last CTA's merge) in runs of `SPLIT_TOKENS`. On an
/// H100, 8 × 4K took 56.6 µs in one wave of 4 splits and 60.5 µs in two waves of 8: about
/// 3.9 µs a wave beside 0.82 µs a run, so 5 runs (bench/RESULTS.md, twenty-first session's
/// sweep). 8 leans towards fewer waves, whose partials also take longer to merge.
const WAVE_UNITS: usize = 8;
const MAX_SPLITS: usize = 256;
/// Threads per CTA of `hbm_read_floor`.
const READ_THREADS: u32 = 256;
/// Rows (sequence × head) per block of the merge kernels: one warp each.
const MERGE_THREADS: u32 = 256;

/// Launches `f` like `LaunchArgs::launch`, and with `overlap` allows programmatic dependent
/// launch (sm_90+): its CTAs may start while the kernel before it on `stream` finishes, and
/// must `griddepcontrol.wait` before reading what that kernel writes.
///
/// # Safety
/// `args` point at `f`'s parameters, in order and of their types, valid until this returns;
/// with `overlap`, `f` waits (`griddepcontrol.wait`) before it reads anything a kernel before
/// it may write.
unsafe fn launch_overlapping(
    f: &CudaFunction,
    cfg: LaunchConfig,
    stream: sys::CUstream,
    args: &mut [*mut std::ffi::c_void],
    overlap: bool,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    // SAFETY: a zeroed attribute is a valid C struct (id 0, value zeroed); both fields are set
    // below before the driver reads it.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream,
        attrs: &mut attr,
        numAttrs: u32::from(overlap),
    };
    // SAFETY: `config` and `attr` live across the call; `f` is a loaded function of this
    // context; the caller vouches for `args`.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// The shape of one KV block: `[2 (K, V), kv_heads, block_tokens, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBlockShape {
    pub kv_heads: usize,
    pub block_tokens: usize,
    pub head_dim: usize,
}

impl KvBlockShape {
    /// Values of K (or of V) in one block.
    pub fn half_elems(&self) -> usize {
        self.kv_heads * self.block_tokens * self.head_dim
    }
    /// Values of K and V in one block.
    pub fn block_elems(&self) -> usize {
        2 * self.half_elems()
    }
}

pub(super) enum PoolBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

/// A point on a stream: everything enqueued there before it.
pub struct StreamMark(cudarc::driver::CudaEvent);

impl std::fmt::Debug for StreamMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamMark")
    }
}

impl StreamMark {
    /// Blocks until the stream has passed this mark.
    pub fn wait(&self) -> Result<()> {
        self.0
            .synchronize()
            .map_err(|e| device_err("stream mark", e))
    }
}

/// KV blocks in device memory: `[n_blocks, 2, kv_heads, block_tokens, head_dim]` in `dtype`.
pub struct KvPool {
    shape: KvBlockShape,
    n_blocks: usize,
    pub(super) data: PoolBuf,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvPool[{} x {:?}] {}",
            self.n_blocks,
            self.shape,
            self.dtype().name()
        )
    }
}

impl KvPool {
    pub fn dtype(&self) -> DType {
        match self.data {
            PoolBuf::F32(_) => DType::F32,
            PoolBuf::F16(_) => DType::F16,
            PoolBuf::BF16(_) => DType::BF16,
        }
    }
    pub fn shape(&self) -> KvBlockShape {
        self.shape
    }
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    pub fn bytes(&self) -> usize {
        self.n_blocks * self.shape.block_elems() * self.dtype().size_bytes()
    }
}

/// Block tables and lengths of a batch of sequences, in device memory.
#[derive(Debug)]
pub struct DeviceBlockTables {
    batch: usize,
    block_tokens: usize,
    /// Columns of `tables` (at least 1).
    max_blocks: usize,
    /// The largest block id a sequence uses, if any sequence is non-empty.
    max_block_id: Option<u32>,
    max_len: usize,
    total_tokens: usize,
    /// `[batch, max_blocks] u32`, unused entries 0.
    tables: CudaSlice<u32>,
    /// `[batch] u32`.
    lens: CudaSlice<u32>,
}

impl DeviceBlockTables {
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Tokens over all sequences (what one decode step reads, times the bytes per token).
    pub fn total_tokens(&self) -> usize {
        self.total_tokens
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// Partials on the device: `o: [rows, n_heads * head_dim] f32`, `lse: [rows, n_heads] f32`.
#[derive(Debug)]
pub struct DevicePartial {
    pub o: CudaTensor,
    pub lse: CudaTensor,
}

/// The attention kernels of the compiled program (see attention.cu for their signatures).
pub(crate) struct AttentionKernels {
    /// `[dtype][dim][group]`: dtype f32, f16, bf16; dim as `FAST_DIMS`; group as `GROUP_SIZES`.
    fast: Vec<DecodeKernel>,
    /// `[dtype]`.
    generic: Vec<DecodeKernel>,
    merge_parts: CudaFunction,
    merge_two: CudaFunction,
    /// `hbm_read_floor`: the pure streaming read the decode bench compares with.
    read_floor: CudaFunction,
    /// The split partials and arrival counters of `decode_attention`, reused by every call.
    scratch: Mutex<SplitScratch>,
    /// Whether decode attention launches may overlap the kernel before them (programmatic
    /// dependent launch: sm_90 and later, unless `STRATA_PDL=0`).
    pub(crate) overlap: bool,
}

/// One decode kernel, its threads per CTA, and how many of its CTAs an SM holds (queried on
/// first use, then kept).
struct DecodeKernel {
    f: CudaFunction,
    threads: u32,
    ctas_per_sm: OnceLock<usize>,
}

impl DecodeKernel {
    fn new(f: CudaFunction, threads: u32) -> Self {
        Self {
            f,
            threads,
            ctas_per_sm: OnceLock::new(),
        }
    }

    /// CTAs of `self.threads` threads resident per SM (2 if the driver cannot say).
    fn ctas_per_sm(&self) -> usize {
        *self.ctas_per_sm.get_or_init(|| {
            self.f
                .occupancy_max_active_blocks_per_multiprocessor(self.threads, 0, None)
                .map(|n| n.max(1) as usize)
                .unwrap_or(2)
        })
    }
}

/// Device scratch of the split kernel, grown on demand and never shrunk.
///
/// Reuse is safe because every kernel that touches it runs on the backend's one stream, in
/// enqueue order: a call's kernel is done with the scratch before the next call's kernel starts.
/// The mutex is held from sizing the scratch to the launch, so two threads cannot interleave
/// their launches over it; a buffer replaced by a larger one is freed in stream order, after the
/// kernels already enqueued on it.
#[derive(Default)]
struct SplitScratch {
    /// Partials: `o: [rows, splits, head_dim]` then `lse: [rows, splits]`, f32.
    part: Option<CudaSlice<f32>>,
    /// `[batch, kv_heads * head_chunks]` u32 arrival counters, zero between launches (each
    /// launch's last CTA of a column resets its counter).
    arrivals: Option<CudaSlice<u32>>,
}

/// The scratch one launch uses: partial `o`, partial `lse` (possibly longer than needed) and the
/// arrival counters.
type SplitBuffers<'a> = (
    CudaViewMut<'a, f32>,
    CudaViewMut<'a, f32>,
    &'a mut CudaSlice<u32>,
);

impl SplitScratch {
    /// Room for `o_len + lse_len` partial values and `columns` counters, NaN-filled partials when
    /// the backend poisons outputs.
    fn reserve(
        &mut self,
        be: &Inner,
        op: &'static str,
        o_len: usize,
        lse_len: usize,
        columns: usize,
    ) -> Result<SplitBuffers<'_>> {
        let need = o_len + lse_len;
        if self.part.as_ref().is_none_or(|p| p.len() < need) {
            self.part = None;
            // SAFETY: the partials are written by the split kernel before its merge reads them
            // (every CTA of a column writes its partial before it counts itself).
            let p = unsafe { be.stream.alloc::<f32>(need.next_power_of_two()) };
            self.part = Some(p.map_err(|e| device_err(op, e))?);
        }
        if self.arrivals.as_ref().is_none_or(|a| a.len() < columns) {
            self.arrivals = None;
            let a = be.stream.alloc_zeros::<u32>(columns.next_power_of_two());
            self.arrivals = Some(a.map_err(|e| device_err(op, e))?);
        }
        let (Some(part), Some(arrivals)) = (self.part.as_mut(), self.arrivals.as_mut()) else {
            return Err(device_err(op, "split scratch missing after allocation"));
        };
        if be.poison.load(Ordering::Relaxed) {
            let (ptr, _sync) = part.device_ptr_mut(&be.stream);
            // SAFETY: `ptr` addresses the live allocation `part`, of at least `need` f32, used
            // on its own stream; all-ones bytes make every f32 a NaN.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    ptr,
                    0xff,
                    need * std::mem::size_of::<f32>(),
                    be.stream.cu_stream(),
                )
            }
            .map_err(|e| device_err(op, e))?;
        }
        let (o, lse) = part.split_at_mut(o_len);
        Ok((o, lse, arrivals))
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn dtype_index(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl AttentionKernels {
    pub(crate) fn bind(module: &Arc<CudaModule>) -> std::result::Result<Self, String> {
        let load = |name: String| {
            module
                .load_function(&name)
                .map_err(|e| format!("kernel `{name}` missing: {e}"))
        };
        let mut fast = Vec::new();
        let mut generic = Vec::new();
        for dt in DTYPES {
            for d in FAST_DIMS {
                for (g, warps) in GROUP_SIZES.into_iter().zip(FAST_WARPS) {
                    let f = load(format!("attn_decode_{}_d{d}_g{g}", dt.name()))?;
                    fast.push(DecodeKernel::new(f, warps * 32));
                }
            }
            let f = load(format!("attn_decode_{}_generic", dt.name()))?;
            generic.push(DecodeKernel::new(f, GENERIC_WARPS * 32));
        }
        Ok(Self {
            fast,
            generic,
            merge_parts: load("attn_merge_parts".into())?,
            merge_two: load("attn_merge_two".into())?,
            read_floor: load("hbm_read_floor".into())?,
            scratch: Mutex::new(SplitScratch::default()),
            overlap: false,
        })
    }

    /// Lets decode attention overlap the kernel before it on devices of compute capability `cc`
    /// that support it (9.0 and later), unless the environment sets `STRATA_PDL=0`.
    pub(crate) fn with_overlap(mut self, cc: (i32, i32)) -> Self {
        self.overlap = cc.0 >= 9 && std::env::var_os("STRATA_PDL").is_none_or(|v| v != "0");
        self
    }

    /// The kernel for `dtype`, `head_dim` and a GQA group of `group` heads, and the query heads
    /// it takes per CTA.
    fn decode(&self, dtype: DType, head_dim: usize, group: usize) -> (&DecodeKernel, usize) {
        let t = dtype_index(dtype);
        let per_cta = GROUP_SIZES
            .iter()
            .copied()
            .find(|&g| g >= group)
            .unwrap_or(MAX_FAST_GROUP);
        match FAST_DIMS.iter().position(|&d| d == head_dim) {
            Some(di) => {
                let gi = GROUP_SIZES
                    .iter()
                    .position(|&g| g == per_cta)
                    .unwrap_or(GROUP_SIZES.len() - 1);
                let idx = (t * FAST_DIMS.len() + di) * GROUP_SIZES.len() + gi;
                (&self.fast[idx], per_cta)
            }
            None => (&self.generic[t], 8),
        }
    }
}

/// The number of splits: minimises (waves of CTAs) × (token runs of `SPLIT_TOKENS` per split +
/// `WAVE_UNITS`), the smallest count within 1% of the best. `resident` is how many CTAs the GPU
/// runs at once. Splits need not divide the blocks, so the count can fill every resident slot:
/// 1 × 32K on an H100 (8 head groups, 264 slots) takes 33 splits of 993 tokens, not 32 of
/// 1,024.
pub fn choose_splits(ctas_per_split: usize, max_len: usize, resident: usize) -> usize {
    let units = max_len.div_ceil(SPLIT_TOKENS).max(1);
    let min_units = (MIN_SPLIT_TOKENS / SPLIT_TOKENS).max(1);
    let cap = (units / min_units).clamp(1, MAX_SPLITS);
    let base = ctas_per_split.max(1);
    let resident = resident.max(1);
    let cost = |s: usize| (base * s).div_ceil(resident) * (units.div_ceil(s) + WAVE_UNITS);
    let best = (1..=cap).map(cost).min().unwrap_or(1);
    (1..=cap)
        .find(|&s| cost(s) * 100 <= best * 101)
        .unwrap_or(1)
}

impl CudaBackend {
    /// A pool of `n_blocks` zeroed KV blocks of `shape` in `dtype`.
    pub fn kv_pool(&self, dtype: DType, shape: KvBlockShape, n_blocks: usize) -> Result<KvPool> {
        let be = &self.inner;
        let op = "kv_pool";
        be.check(op)?;
        if shape.kv_heads == 0 || shape.block_tokens == 0 || shape.head_dim == 0 {
            return Err(shape_err(op, format!("empty block shape {shape:?}")));
        }
        let n = n_blocks
            .checked_mul(shape.block_elems())
            .ok_or_else(|| shape_err(op, format!("{n_blocks} blocks overflow")))?
            .max(1);
        let s = &be.stream;
        let data = match dtype {
            DType::F32 => PoolBuf::F32(s.alloc_zeros(n).map_err(|e| device_err(op, e))?),
            DType::F16 => PoolBuf::F16(s.alloc_zeros(n).map_err(|e| device_err(op, e))?),
            DType::BF16 => PoolBuf::BF16(s.alloc_zeros(n).map_err(|e| device_err(op, e))?),
        };
        Ok(KvPool {
            shape,
            n_blocks,
            data,
        })
    }

    /// Writes blocks `first_block ..` of `pool` from `blocks: [n, 2, kv_heads, block_tokens,
    /// head_dim] f32`, rounded to the pool's dtype (round to nearest even).
    pub fn kv_pool_write(
        &self,
        pool: &mut KvPool,
        first_block: usize,
        blocks: &[f32],
    ) -> Result<()> {
        self.kv_pool_write_kv(pool, first_block, KvSlice::F32(blocks))
    }

    /// Writes blocks `first_block ..` of `pool` from `blocks: [n, 2, kv_heads, block_tokens,
    /// head_dim]` in any dtype. Blocks already in the pool's dtype are copied as they are (no
    /// conversion on either side: a host tier of the pool's dtype sends its bytes); others are
    /// converted on the host first (widened exactly, or rounded to nearest even).
    pub fn kv_pool_write_kv(
        &self,
        pool: &mut KvPool,
        first_block: usize,
        blocks: KvSlice<'_>,
    ) -> Result<()> {
        let be = &self.inner;
        let op = "kv_pool_write";
        be.check(op)?;
        let per = pool.shape.block_elems();
        if !blocks.len().is_multiple_of(per) || first_block + blocks.len() / per > pool.n_blocks {
            return Err(shape_err(
                op,
                format!(
                    "{} values from block {first_block}: not whole blocks of {per}, or past the \
                     pool's {} blocks",
                    blocks.len(),
                    pool.n_blocks
                ),
            ));
        }
        let range = first_block * per..first_block * per + blocks.len();
        if range.is_empty() {
            return Ok(());
        }
        let s = &be.stream;
        let r = match (&mut pool.data, blocks) {
            (PoolBuf::F32(d), KvSlice::F32(h)) => s.memcpy_htod(h, &mut d.slice_mut(range)),
            (PoolBuf::F16(d), KvSlice::F16(h)) => s.memcpy_htod(h, &mut d.slice_mut(range)),
            (PoolBuf::BF16(d), KvSlice::BF16(h)) => s.memcpy_htod(h, &mut d.slice_mut(range)),
            (PoolBuf::F32(d), other) => s.memcpy_htod(&other.to_f32_vec(), &mut d.slice_mut(range)),
            (PoolBuf::F16(d), other) => {
                let h: Vec<f16> = other.to_f32_vec().into_iter().map(f16::from_f32).collect();
                s.memcpy_htod(&h, &mut d.slice_mut(range))
            }
            (PoolBuf::BF16(d), other) => {
                let h: Vec<bf16> = other.to_f32_vec().into_iter().map(bf16::from_f32).collect();
                s.memcpy_htod(&h, &mut d.slice_mut(range))
            }
        };
        // The host vectors above may die with this call: wait for the copy to have read them.
        r.and_then(|()| s.synchronize())
            .map_err(|e| device_err(op, e))
    }

    /// Copies `blocks` whole blocks from host memory at `src` (laid out as pool blocks, in the
    /// pool's dtype) into pool blocks `first_block ..`, on the compute stream, and returns
    /// without waiting: kernels enqueued later read the copied blocks. The SMs read them over
    /// PCIe where the memory is mapped for the device (see [`Inner::copy_from_mapped_host`]), so
    /// a prompt's blocks do not wait behind the next layers' weights on the copy engine.
    ///
    /// # Safety
    /// `src` must point to `blocks` blocks of readable host memory, page-locked within one
    /// registration (a copy spanning two separately registered ranges fails), that stays alive
    /// and unwritten until a [`CudaBackend::compute_mark`] recorded after this call has passed.
    pub unsafe fn kv_pool_write_pinned_async(
        &self,
        pool: &mut KvPool,
        first_block: usize,
        blocks: usize,
        src: *const u8,
    ) -> Result<()> {
        let be = &self.inner;
        let op = "kv_pool_write_pinned_async";
        be.check(op)?;
        if first_block + blocks > pool.n_blocks {
            return Err(shape_err(
                op,
                format!(
                    "blocks {first_block}..{} past the pool's {}",
                    first_block + blocks,
                    pool.n_blocks
                ),
            ));
        }
        let block_bytes = pool.shape.block_elems() * pool.dtype().size_bytes();
        let bytes = blocks * block_bytes;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the caller guarantees `src` holds `bytes` readable bytes that live until the
        // copy has run.
        let host = unsafe { std::slice::from_raw_parts(src, bytes) };
        be.timed_copy_on(&be.stream, op, super::transfer::Dir::H2d, bytes, |s| {
            let (base, _sync) = match &mut pool.data {
                PoolBuf::F32(d) => d.device_ptr_mut(s),
                PoolBuf::F16(d) => d.device_ptr_mut(s),
                PoolBuf::BF16(d) => d.device_ptr_mut(s),
            };
            let dst = base + (first_block * block_bytes) as u64;
            // SAFETY: the destination range lies inside the pool's allocation (checked above),
            // used on its own stream; the source is page-locked and outlives the copy (the
            // caller's contract).
            if unsafe { be.copy_from_mapped_host(op, dst, host) }? {
                return Ok(());
            }
            // SAFETY: as above.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, s.cu_stream()) }
                .map_err(|e| device_err(op, e))
        })
    }

    /// Marks everything enqueued on the compute stream so far.
    pub fn compute_mark(&self) -> Result<StreamMark> {
        self.inner
            .stream
            .record_event(None)
            .map(StreamMark)
            .map_err(|e| device_err("compute_mark", e))
    }

    /// Fills the whole pool by repeating its first `src_blocks` blocks (for benchmarks: a large
    /// pool of realistic data without uploading all of it).
    pub fn kv_pool_tile(&self, pool: &mut KvPool, src_blocks: usize) -> Result<()> {
        let be = &self.inner;
        let op = "kv_pool_tile";
        be.check(op)?;
        if src_blocks == 0 || src_blocks > pool.n_blocks {
            return Err(shape_err(
                op,
                format!("{src_blocks} of {} blocks", pool.n_blocks),
            ));
        }
        let block_bytes = pool.shape.block_elems() * pool.dtype().size_bytes();
        let total = pool.n_blocks * block_bytes;
        let s = &be.stream;
        let (base, _sync) = match &mut pool.data {
            PoolBuf::F32(d) => d.device_ptr_mut(s),
            PoolBuf::F16(d) => d.device_ptr_mut(s),
            PoolBuf::BF16(d) => d.device_ptr_mut(s),
        };
        let mut done = src_blocks * block_bytes;
        while done < total {
            let len = done.min(total - done);
            // SAFETY: source [0, len) and destination [done, done + len) lie inside the pool's
            // `total`-byte allocation and do not overlap (len <= done); the copy is ordered on
            // the pool's stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    base + done as u64,
                    base,
                    len,
                    s.cu_stream(),
                )
            }
            .map_err(|e| device_err(op, e))?;
            done += len;
        }
        Ok(())
    }

    /// Uploads the block tables of a batch: sequence `i` has `seq_lens[i]` tokens in blocks
    /// `tables[i][..ceil(seq_lens[i] / block_tokens)]`, in position order.
    pub fn upload_block_tables<T: AsRef<[u32]>>(
        &self,
        tables: &[T],
        seq_lens: &[usize],
        block_tokens: usize,
    ) -> Result<DeviceBlockTables> {
        let be = &self.inner;
        let op = "upload_block_tables";
        be.check(op)?;
        check_len(op, "seq_lens", seq_lens.len(), tables.len())?;
        if block_tokens == 0 {
            return Err(shape_err(op, "block_tokens is 0"));
        }
        let mut max_blocks = 1;
        let mut max_block_id = None;
        for (i, (t, &len)) in tables.iter().zip(seq_lens).enumerate() {
            let need = len.div_ceil(block_tokens);
            let t = t.as_ref();
            if t.len() < need || u32::try_from(len).is_err() {
                return Err(shape_err(
                    op,
                    format!(
                        "sequence {i}: {len} tokens need {need} blocks, the table has {}",
                        t.len()
                    ),
                ));
            }
            max_blocks = max_blocks.max(need);
            max_block_id = t[..need].iter().copied().max().max(max_block_id);
        }
        let mut flat = vec![0u32; tables.len() * max_blocks];
        for ((row, t), &len) in flat.chunks_exact_mut(max_blocks).zip(tables).zip(seq_lens) {
            let need = len.div_ceil(block_tokens);
            row[..need].copy_from_slice(&t.as_ref()[..need]);
        }
        let lens: Vec<u32> = seq_lens.iter().map(|&l| l as u32).collect();
        Ok(DeviceBlockTables {
            batch: tables.len(),
            block_tokens,
            max_blocks,
            max_block_id,
            max_len: seq_lens.iter().copied().max().unwrap_or(0),
            total_tokens: seq_lens.iter().sum(),
            tables: be.upload(op, &flat)?,
            lens: be.upload(op, &lens)?,
        })
    }

    /// The number of splits [`CudaBackend::decode_attention`] uses for this batch.
    pub fn decode_splits(
        &self,
        tables: &DeviceBlockTables,
        pool: &KvPool,
        g: &AttentionGeometry,
    ) -> usize {
        let group = g.n_heads / g.n_kv_heads.max(1);
        let (k, per_cta) = self.inner.attn.decode(pool.dtype(), g.head_dim, group);
        let chunks = group.div_ceil(per_cta).max(1);
        let resident = self.inner.info.multiprocessors.max(1) as usize * k.ctas_per_sm();
        choose_splits(
            tables.batch * g.n_kv_heads * chunks,
            tables.max_len,
            resident,
        )
    }

    /// Decode attention of `q: [batch, n_heads * head_dim] f32` (one query per sequence, seeing
    /// all its tokens) over the blocks of `pool` named by `tables`.
    pub fn decode_attention(
        &self,
        q: &CudaTensor,
        pool: &KvPool,
        tables: &DeviceBlockTables,
        g: &AttentionGeometry,
    ) -> Result<DevicePartial> {
        let splits = self.decode_splits(tables, pool, g);
        self.decode_attention_with_splits(q, pool, tables, g, splits)
    }

    /// [`CudaBackend::decode_attention`] with a given number of splits (1..=1024; splits past a
    /// sequence's end are empty and contribute nothing).
    pub fn decode_attention_with_splits(
        &self,
        q: &CudaTensor,
        pool: &KvPool,
        tables: &DeviceBlockTables,
        g: &AttentionGeometry,
        splits: usize,
    ) -> Result<DevicePartial> {
        let be = &self.inner;
        let op = "decode_attention";
        check_decode(q, pool, tables, g, splits)?;
        let (batch, hd, n_heads) = (tables.batch, g.head_dim, g.n_heads);
        let group = n_heads / g.n_kv_heads;
        let (k, per_cta) = be.attn.decode(pool.dtype(), hd, group);
        let chunks = group.div_ceil(per_cta);
        let rows = batch * n_heads;
        let qb = be.buf(op, q)?;
        let mut o = be.output(op, rows * hd)?;
        let mut lse = be.output(op, rows)?;
        if rows == 0 {
            return Ok(partial(batch, n_heads, hd, o, lse));
        }
        let columns = g.n_kv_heads * chunks;
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, columns as u32, batch as u32),
            block_dim: (k.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let u = |x: usize| x as u32;
        let (max_blocks, nh, kvh, d, bt, s) = (
            u(tables.max_blocks),
            u(n_heads),
            u(g.n_kv_heads),
            u(hd),
            u(g.block_tokens),
            u(splits),
        );
        let scale_log2 = g.scale * std::f32::consts::LOG2_E;
        // Held until the launch is enqueued: the scratch is this launch's until then.
        let mut scratch = be
            .attn
            .scratch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut split_bufs = if splits > 1 {
            let o_len = rows * splits * hd;
            Some(scratch.reserve(be, op, o_len, rows * splits, batch * columns)?)
        } else {
            None
        };
        {
            // The pointers' guards end with this block, before `o` and `lse` move out.
            let st = &be.stream;
            let (o_ptr, _o) = o.device_ptr_mut(st);
            let (lse_ptr, _lse) = lse.device_ptr_mut(st);
            let (part_o, part_lse, arrivals) = match &mut split_bufs {
                Some((po, pl, ar)) => (
                    po.device_ptr_mut(st).0,
                    pl.device_ptr_mut(st).0,
                    ar.device_ptr_mut(st).0,
                ),
                None => (0, 0, 0),
            };
            let (q_ptr, _q) = qb.device_ptr(st);
            let (pool_ptr, _p) = match &pool.data {
                PoolBuf::F32(p) => p.device_ptr(st),
                PoolBuf::F16(p) => p.device_ptr(st),
                PoolBuf::BF16(p) => p.device_ptr(st),
            };
            let (tables_ptr, _t) = tables.tables.device_ptr(st);
            let (lens_ptr, _l) = tables.lens.device_ptr(st);
            let mut ptrs = [
                o_ptr, lse_ptr, part_o, part_lse, arrivals, q_ptr, pool_ptr, tables_ptr, lens_ptr,
            ];
            let mut ints = [max_blocks, nh, kvh, d, bt, s];
            let mut scale = scale_log2;
            let mut args: Vec<*mut std::ffi::c_void> = ptrs
                .iter_mut()
                .map(|p| (p as *mut u64).cast())
                .chain(ints.iter_mut().map(|v| (v as *mut u32).cast()))
                .chain([(&mut scale as *mut f32).cast()])
                .collect();
            // SAFETY: attn_decode_*(float* out_o, float* out_lse, float* part_o, float* part_lse,
            // u32* arrivals, const float* q, const T* pool, const u32* tables, const u32* lens,
            // u32 max_blocks, u32 n_heads, u32 kv_heads, u32 head_dim, u32 bt, u32 splits,
            // float scale_log2), T the pool's dtype: `args` points at those 16 values, in order,
            // each alive until the call returns (the driver copies them at launch). `check_decode`
            // verified the shapes: q holds batch * n_heads * head_dim values, o rows * head_dim and
            // lse rows, every block id a sequence reads is below the pool's n_blocks, and tables is
            // [batch, max_blocks] with lens [batch]. With several splits, part_o holds rows * splits
            // * head_dim values, part_lse at least rows * splits and arrivals at least batch *
            // columns counters, all zero (the previous launch on this stream left them so); with one
            // split the three are null and never read. The kernel reads nothing an earlier kernel
            // may write before its `griddepcontrol.wait` (see attention.cu), so overlapping the
            // kernel before (`be.attn.overlap`) is safe.
            unsafe { launch_overlapping(&k.f, cfg, st.cu_stream(), &mut args, be.attn.overlap) }
                .map_err(|e| device_err(op, e))?;
        }
        // The scratch views' borrows end here; the lock is held until the launch is enqueued.
        drop(scratch);
        Ok(partial(batch, n_heads, hd, o, lse))
    }

    /// Merges partials over disjoint token sets (e.g. from different tiers) into the partial
    /// over their union: every part `o: [rows, n_heads * head_dim]`, `lse: [rows, n_heads]`.
    pub fn merge_partials(&self, parts: &[&DevicePartial]) -> Result<DevicePartial> {
        let be = &self.inner;
        let op = "merge_partials";
        be.check(op)?;
        let first = parts
            .first()
            .ok_or_else(|| shape_err(op, "no partials to merge"))?;
        let (batch, n_heads) = (first.lse.rows, first.lse.cols);
        let width = first.o.cols;
        if first.o.rows != batch || n_heads == 0 || !width.is_multiple_of(n_heads) {
            return Err(shape_err(
                op,
                format!("o is [{}, {width}], lse [{batch}, {n_heads}]", first.o.rows),
            ));
        }
        for p in parts {
            if (p.o.rows, p.o.cols, p.lse.rows, p.lse.cols) != (batch, width, batch, n_heads) {
                return Err(shape_err(op, "partials differ in shape"));
            }
        }
        let (hd, rows) = (width / n_heads, batch * n_heads);
        if rows > u32::MAX as usize || parts.len() > u32::MAX as usize {
            return Err(shape_err(op, format!("{rows} rows exceed one launch")));
        }
        let mut o = be.output(op, rows * hd)?;
        let mut lse = be.output(op, rows)?;
        if rows > 0 {
            let mut o_ptrs = Vec::with_capacity(parts.len());
            let mut l_ptrs = Vec::with_capacity(parts.len());
            let mut guards = Vec::with_capacity(2 * parts.len());
            for p in parts {
                let (op_, g1) = be.buf(op, &p.o)?.device_ptr(&be.stream);
                let (lp, g2) = be.buf(op, &p.lse)?.device_ptr(&be.stream);
                o_ptrs.push(op_);
                l_ptrs.push(lp);
                guards.push(g1);
                guards.push(g2);
            }
            let (n, n_rows, d) = (parts.len() as u32, rows as u32, hd as u32);
            if let ([o0, o1], [l0, l1]) = (&o_ptrs[..], &l_ptrs[..]) {
                // Two parts (a decode layer's device and host partials, on every layer with a
                // host tier) go by address: no pointer arrays to upload, two staging copies fewer.
                let mut m = be.stream.launch_builder(&be.attn.merge_two);
                m.arg(&mut o)
                    .arg(&mut lse)
                    .arg(o0)
                    .arg(l0)
                    .arg(o1)
                    .arg(l1)
                    .arg(&n_rows)
                    .arg(&d);
                // SAFETY: attn_merge_two(float* o, float* lse, const float* o0, const float* l0,
                // const float* o1, const float* l1, u32 rows, u32 dim); each address is a live
                // part of rows * dim (o) or rows (lse) values, checked above, kept alive by
                // `parts` until the kernel has run (it is ordered before any later free on this
                // stream).
                unsafe { m.launch(merge_cfg(rows)) }.map_err(|e| device_err(op, e))?;
            } else {
                let (o_dev, l_dev) = (be.upload(op, &o_ptrs)?, be.upload(op, &l_ptrs)?);
                let mut m = be.stream.launch_builder(&be.attn.merge_parts);
                m.arg(&mut o)
                    .arg(&mut lse)
                    .arg(&o_dev)
                    .arg(&l_dev)
                    .arg(&n)
                    .arg(&n_rows)
                    .arg(&d);
                // SAFETY: attn_merge_parts(float* o, float* lse, const u64* o_ptrs,
                // const u64* lse_ptrs, u32 n, u32 rows, u32 dim); each pointer addresses a live
                // part of rows * dim (o) or rows (lse) values, checked above, kept alive by
                // `parts` until the kernel has run (it is ordered before any later free on this
                // stream).
                unsafe { m.launch(merge_cfg(rows)) }.map_err(|e| device_err(op, e))?;
            }
            drop(guards);
        }
        Ok(partial(batch, n_heads, hd, o, lse))
    }

    /// Runs `f` between two timing events on the backend's stream; returns the milliseconds
    /// the GPU spent between them and `f`'s result.
    pub fn time_ms<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
        let be = &self.inner;
        let op = "time_ms";
        be.check(op)?;
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let e0 = be
            .stream
            .record_event(flags)
            .map_err(|e| device_err(op, e))?;
        let out = f()?;
        let e1 = be
            .stream
            .record_event(flags)
            .map_err(|e| device_err(op, e))?;
        e1.synchronize().map_err(|e| device_err(op, e))?;
        let ms = e0.elapsed_ms(&e1).map_err(|e| device_err(op, e))?;
        Ok((ms as f64, out))
    }

    /// Milliseconds per device-to-device copy of `bytes` bytes: `reps` copies between two
    /// buffers, timed together, best of `trials`.
    pub fn copy_time_ms(&self, bytes: usize, reps: usize, trials: usize) -> Result<f64> {
        self.copy_span_time_ms(bytes, bytes, reps, trials)
    }

    /// Milliseconds per device-to-device copy of `bytes` bytes, where copy `i` moves bytes
    /// `[j * bytes, (j + 1) * bytes)` of one `span`-byte buffer to the same place in another
    /// (`j = i mod span / bytes`): with a span past the L2 cache, no copy is served by the one
    /// before it. `reps` copies timed together, best of `trials`.
    pub fn copy_span_time_ms(
        &self,
        bytes: usize,
        span: usize,
        reps: usize,
        trials: usize,
    ) -> Result<f64> {
        let be = &self.inner;
        let op = "copy_time_ms";
        be.check(op)?;
        let bytes = bytes.max(1);
        let slots = (span / bytes).max(1);
        let alloc = |n| {
            be.stream
                .alloc_zeros::<u8>(n)
                .map_err(|e| device_err(op, e))
        };
        let src = alloc(slots * bytes)?;
        let mut dst = alloc(slots * bytes)?;
        self.best_call_ms(slots, reps, trials, |i| {
            let at = (i % slots) * bytes;
            be.stream
                .memcpy_dtod(
                    &src.slice(at..at + bytes),
                    &mut dst.slice_mut(at..at + bytes),
                )
                .map_err(|e| device_err(op, e))
        })
    }

    /// Milliseconds per call of `call(i)` (`i` counting calls): one warm-up call per slot, then
    /// `reps` calls timed together, best of `trials`.
    fn best_call_ms(
        &self,
        slots: usize,
        reps: usize,
        trials: usize,
        mut call: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        (0..slots).try_for_each(&mut call)?;
        let mut best = f64::INFINITY;
        for _ in 0..trials.max(1) {
            let (ms, ()) = self.time_ms(|| (0..reps.max(1)).try_for_each(&mut call))?;
            best = best.min(ms / reps.max(1) as f64);
        }
        Ok(best)
    }

    /// Milliseconds per pure streaming read of `bytes` bytes (rounded down to 16-byte vectors)
    /// by `hbm_read_floor`, a grid that fills every SM; read `i` covers slot `i mod span / bytes`
    /// of a `span`-byte buffer, as in [`CudaBackend::copy_span_time_ms`]. `reps` reads timed
    /// together, best of `trials`: the floor for a kernel that reads `bytes` once per call.
    pub fn read_time_ms(
        &self,
        bytes: usize,
        span: usize,
        reps: usize,
        trials: usize,
    ) -> Result<f64> {
        let be = &self.inner;
        let op = "read_time_ms";
        be.check(op)?;
        let vecs = (bytes / 16).max(1);
        let slots = (span / (vecs * 16)).max(1);
        let f = &be.attn.read_floor;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(READ_THREADS, 0, None)
            .map(|n| n.max(1) as usize)
            .unwrap_or(1);
        let ctas = be.info.multiprocessors.max(1) as usize * per_sm;
        let src = be
            .stream
            .alloc_zeros::<u8>(slots * vecs * 16)
            .map_err(|e| device_err(op, e))?;
        let mut sink = be
            .stream
            .alloc_zeros::<u32>(ctas)
            .map_err(|e| device_err(op, e))?;
        let n_vec = vecs as u64;
        let cfg = LaunchConfig {
            grid_dim: (ctas as u32, 1, 1),
            block_dim: (READ_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        self.best_call_ms(slots, reps, trials, |i| {
            let at = (i % slots) * vecs * 16;
            let view = src.slice(at..at + vecs * 16);
            let mut b = be.stream.launch_builder(f);
            b.arg(&view).arg(&n_vec).arg(&mut sink);
            // SAFETY: hbm_read_floor(const uint4* src, u64 n_vec, u32* sink): `view` holds
            // n_vec 16-byte vectors (its offset is a multiple of 16 in a 16-byte aligned
            // allocation) and `sink` one u32 per CTA of the grid.
            unsafe { b.launch(cfg) }
                .map(drop)
                .map_err(|e| device_err(op, e))
        })
    }
}

fn partial(
    batch: usize,
    n_heads: usize,
    hd: usize,
    o: CudaSlice<f32>,
    lse: CudaSlice<f32>,
) -> DevicePartial {
    DevicePartial {
        o: Inner::tensor(batch, n_heads * hd, o),
        lse: Inner::tensor(batch, n_heads, lse),
    }
}

fn merge_cfg(rows: usize) -> LaunchConfig {
    let per_block = (MERGE_THREADS / 32) as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(per_block) as u32, 1, 1),
        block_dim: (MERGE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_decode(
    q: &CudaTensor,
    pool: &KvPool,
    tables: &DeviceBlockTables,
    g: &AttentionGeometry,
    splits: usize,
) -> Result<()> {
    let op = "decode_attention";
    let err = |d: String| Err::<(), KernelError>(shape_err(op, d));
    let s = pool.shape;
    if (s.kv_heads, s.block_tokens, s.head_dim) != (g.n_kv_heads, g.block_tokens, g.head_dim)
        || tables.block_tokens != g.block_tokens
    {
        return err(format!(
            "pool blocks {s:?} and tables of {} tokens per block do not match {g:?}",
            tables.block_tokens
        ));
    }
    if g.n_kv_heads == 0 || !g.n_heads.is_multiple_of(g.n_kv_heads) || g.head_dim == 0 {
        return err(format!(
            "{} heads over {} KV heads",
            g.n_heads, g.n_kv_heads
        ));
    }
    if !FAST_DIMS.contains(&g.head_dim) && g.head_dim > GENERIC_MAX_DIM {
        return err(format!("head_dim {} > {GENERIC_MAX_DIM}", g.head_dim));
    }
    if (q.rows, q.cols) != (tables.batch, g.n_heads * g.head_dim) {
        return err(format!(
            "q is [{}, {}], expected [{}, {}]",
            q.rows,
            q.cols,
            tables.batch,
            g.n_heads * g.head_dim
        ));
    }
    if let Some(id) = tables.max_block_id
        && id as usize >= pool.n_blocks
    {
        return err(format!(
            "block id {id} outside the pool of {}",
            pool.n_blocks
        ));
    }
    let group = g.n_heads / g.n_kv_heads;
    let ctas_y = g.n_kv_heads * group.div_ceil(MAX_FAST_GROUP).max(1);
    if !(1..=1024).contains(&splits) || tables.batch > 65_535 || ctas_y > 65_535 {
        return err(format!(
            "{splits} splits, batch {}, {ctas_y} head groups exceed one launch",
            tables.batch
        ));
    }
    let rows = tables.batch * g.n_heads;
    if rows
        .checked_mul(splits * g.head_dim)
        .is_none_or(|n| n > u32::MAX as usize * 64)
    {
        return err(format!("{rows} rows x {splits} splits too large"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{MAX_SPLITS, MIN_SPLIT_TOKENS, choose_splits};

    /// An H100's 132 SMs with two CTAs each, Llama-3-8B's 8 head groups per sequence.
    const SLOTS: usize = 264;

    #[test]
    fn splits_fill_the_resident_slots_without_dividing_blocks() {
        // 1 × 32K and 1 × 128K: 33 splits fill all 264 slots (32 leave 8 empty).
        assert_eq!(choose_splits(8, 32 * 1024, SLOTS), 33);
        assert_eq!(choose_splits(8, 128 * 1024, SLOTS), 33);
        // 1 × 4K: 33 splits would be no shorter in whole 16-token runs; the fewer wins.
        assert_eq!(choose_splits(8, 4096, SLOTS), 32);
        // 8 × 4K and 8 × 128K: 4 splits are one wave of 256 CTAs; 32 × 4K needs no split,
        // nor does 64 × 32K (two waves of 256, where 17 splits took 33 waves).
        assert_eq!(choose_splits(64, 4096, SLOTS), 4);
        assert_eq!(choose_splits(64, 128 * 1024, SLOTS), 4);
        assert_eq!(choose_splits(256, 4096, SLOTS), 1);
        assert_eq!(choose_splits(512, 32 * 1024, SLOTS), 1);
        // Never a split shorter than MIN_SPLIT_TOKENS, never more than MAX_SPLITS.
        assert_eq!(choose_splits(1, MIN_SPLIT_TOKENS - 1, SLOTS), 1);
        assert_eq!(choose_splits(1, 1, SLOTS), 1);
        for len in [1, 17, 100, 1000, 4096, 32 * 1024, 1 << 20] {
            for base in [1, 8, 64, 512] {
                let s = choose_splits(base, len, SLOTS);
                assert!((1..=MAX_SPLITS).contains(&s), "{base} × {len}: {s}");
                assert!(s == 1 || len / s >= MIN_SPLIT_TOKENS, "{base} × {len}: {s}");
            }
        }
    }
}
