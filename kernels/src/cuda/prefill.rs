//! Causal prefill attention on the GPU over the paged KV pool: FlashAttention-2 style tiles on
//! tensor cores (prefill.cu), for the rows of one forward call (prompt chunks of any number of
//! sequences), returning mergeable partials like decode.
//!
//! - **Tables.** [`DevicePagedTables`]: per sequence, the blocks the GPU tier holds — a *subset*
//!   of the sequence's blocks in position order ([`SeqBlocks`]: ids, the position of each
//!   block's first token, and the valid tokens of the last listed block; every other listed
//!   block is full). Blocks not listed (on the host or disk tiers) are simply not attended: the
//!   result is the partial over the listed tokens, to merge with the other tiers' partials.
//!   Checked at upload: ids inside the pool, starts multiples of `block_tokens` and strictly
//!   increasing, lengths in range.
//! - **Rows.** [`DeviceQueryRows`]: `(sequence, position)` per query row, uploaded once per
//!   forward call; a sequence's rows are consecutive and in increasing position (a prompt
//!   chunk, which may start mid-sequence). Cut at upload into tiles of 64 and of 128 rows of one
//!   sequence, grouped by sequence (a sequence's K and V then stay in L2 across its tiles), the
//!   heaviest sequence first and within one the heaviest tile first.
//! - **Attention.** [`CudaBackend::prefill_attention`]: every row of `q: [rows, n_heads *
//!   head_dim] f32` attends causally (key position <= row position) over its sequence's listed
//!   blocks; GQA maps query head `h` to KV head `h / (n_heads / kv_heads)` (KV never
//!   replicated). Output [`DevicePartial`]: `o: [rows, n_heads * head_dim]`, `lse: [rows,
//!   n_heads]` (natural log; `-inf` and `o = 0` for a row that sees no key).
//! - **Kernels.** f16/bf16 pools with head_dim 64 or 128 on sm_80 or newer: the tensor-core
//!   kernel (q and P rounded to the pool's dtype for the mma, f32 accumulation and softmax), in
//!   two shapes ([`PrefillKernel`]); on Hopper (9.0), the same arithmetic on warpgroup tensor
//!   cores (wgmma, `prefill_hopper.cu`). Every other pool (f32, other head dims up to 256,
//!   older GPUs): a generic kernel in f32 math.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};

use super::attention::{DevicePartial, KvPool, PoolBuf};
use super::{CudaBackend, CudaTensor, Inner, device_err};
use crate::{DType, KernelError, Result, shape_err};

/// Key slots per tile; `PF_BN` in prefill.cu.
const KEY_TILE: usize = 64;
/// head_dim at most for the generic kernel; `PF_GENERIC_MAX_DIM` in prefill.cu.
const GENERIC_MAX_DIM: usize = 256;
const GENERIC_THREADS: u32 = 128;
/// head_dims of the tensor-core kernel.
const MMA_DIMS: [usize; 2] = [64, 128];
/// Words per tile descriptor: row0, nrows, b, min_pos, max_pos, 3 unused.
const TILE_WORDS: usize = 8;

/// Which kernel [`CudaBackend::prefill_attention_with`] runs (benchmarks and tests; the
/// default, `Auto`, is what [`CudaBackend::prefill_attention`] does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// Where the pool allows the tensor-core kernel: on Hopper `Wgmma128`, or `Wgmma64` for
    /// prompts of at most 512 tokens or when `Wgmma128` would not give every SM two CTAs, and
    /// `Wgmma64K32` for prompts of at most 512 tokens that make at least 8 waves of its CTAs;
    /// elsewhere `Mma128`, or `Mma64` in the second case; else the generic kernel.
    Auto,
    /// The tensor-core kernel, 64 query rows per CTA (4 warps of 16 rows, Q in registers).
    Mma64,
    /// The tensor-core kernel, 128 query rows per CTA (4 warps of 32 rows: each K/V fragment
    /// read from shared memory feeds two mma; Q read from shared memory). On an H100: 7-10%
    /// faster than `Mma64` from 2K-token prompts up, even at 64 × 512 (`gpu-prefill`).
    Mma128,
    /// Hopper's warpgroup tensor cores (wgmma, prefill_hopper.cu): 64 query rows per CTA (one
    /// warpgroup) and key tiles of 64, small enough for two CTAs per SM. Compute capability 9.0
    /// only.
    Wgmma64,
    /// `Wgmma64` with key tiles of 32: fewer registers and half the shared memory, so three
    /// CTAs share an SM. Compute capability 9.0 only.
    Wgmma64K32,
    /// Hopper's warpgroup tensor cores: 128 query rows per CTA (two warpgroups of 64), key
    /// tiles of 128, the softmax of one key tile beside the tensor cores' product of the
    /// previous one; one CTA per SM. Compute capability 9.0 only.
    Wgmma128,
    /// The generic (f32 math, no tensor cores) kernel.
    Generic,
}

/// The blocks of one sequence that the GPU pool holds, in position order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqBlocks {
    /// Pool block ids.
    pub ids: Vec<u32>,
    /// The position of each block's first token: multiples of `block_tokens`, strictly
    /// increasing (gaps allowed: the blocks between live in other tiers).
    pub starts: Vec<u32>,
    /// Valid tokens of the last listed block, `1..=block_tokens` (ignored when no block is
    /// listed); every other listed block is full.
    pub last_len: usize,
}

impl SeqBlocks {
    /// All the blocks of a sequence of `len` tokens, `ids[i]` holding positions
    /// `i * block_tokens ..`; `ids` must name at least `ceil(len / block_tokens)` blocks (extra
    /// ids are ignored).
    pub fn contiguous(ids: &[u32], len: usize, block_tokens: usize) -> Result<SeqBlocks> {
        let op = "SeqBlocks::contiguous";
        if block_tokens == 0 {
            return Err(shape_err(op, "block_tokens is 0"));
        }
        let need = len.div_ceil(block_tokens);
        if ids.len() < need {
            return Err(shape_err(
                op,
                format!("{len} tokens need {need} blocks, {} given", ids.len()),
            ));
        }
        let starts = (0..need)
            .map(|i| {
                u32::try_from(i * block_tokens)
                    .map_err(|_| shape_err(op, format!("{len} tokens exceed u32 positions")))
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(SeqBlocks {
            ids: ids[..need].to_vec(),
            starts,
            last_len: len - need.saturating_sub(1) * block_tokens,
        })
    }

    /// Valid tokens over the listed blocks.
    pub fn tokens(&self, block_tokens: usize) -> usize {
        match self.ids.len() {
            0 => 0,
            n => (n - 1) * block_tokens + self.last_len,
        }
    }
}

/// [`SeqBlocks`] of a batch in device memory, CSR by sequence.
#[derive(Debug)]
pub struct DevicePagedTables {
    batch: usize,
    block_tokens: usize,
    /// The largest listed block id, if any block is listed.
    max_block_id: Option<u32>,
    /// `[entries] u32` each: block id, position of its first token.
    ids: CudaSlice<u32>,
    starts: CudaSlice<u32>,
    /// `[batch + 1] u32`: sequence `b` lists entries `seq_first[b] .. seq_first[b + 1]`.
    seq_first: CudaSlice<u32>,
    /// `[batch] u32`: valid tokens over the listed blocks.
    seq_tokens: CudaSlice<u32>,
}

impl DevicePagedTables {
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }
}

/// Tile descriptors `[n, TILE_WORDS] u32` for one tile size.
#[derive(Debug)]
struct TileList {
    n: usize,
    data: CudaSlice<u32>,
}

/// The query rows of one forward call in device memory (see the module header).
#[derive(Debug)]
pub struct DeviceQueryRows {
    rows: usize,
    /// The largest sequence index of any row.
    max_b: Option<u32>,
    /// The largest position of any row (a row sees at most this many keys plus one).
    max_pos: Option<u32>,
    /// `[rows] u32`.
    row_pos: CudaSlice<u32>,
    /// Tiles of at most 64 rows, and of at most 128.
    tiles64: TileList,
    tiles128: TileList,
}

impl DeviceQueryRows {
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// The prefill kernels of the compiled program (see prefill.cu for their signatures).
pub(crate) struct PrefillKernels {
    /// `[dtype f16, bf16][dim as MMA_DIMS][shape as MMA_SHAPES]`, each with whether its shared
    /// memory limit could be raised to what it needs.
    mma: Vec<(CudaFunction, bool)>,
    /// `[dtype f16, bf16][dim as MMA_DIMS][shape as WGMMA_SHAPES]`, as `mma`; empty unless the
    /// GPU is Hopper (9.0), the only architecture whose build holds them.
    wgmma: Vec<(CudaFunction, bool)>,
    /// `[dtype f32, f16, bf16]`.
    generic: Vec<CudaFunction>,
}

/// The tensor-core kernel shapes: (kernel, entry-point suffix, query rows per CTA, Q kept in
/// registers). Every shape runs 4 warps.
const MMA_SHAPES: [(PrefillKernel, &str, usize, bool); 2] = [
    (PrefillKernel::Mma64, "r64", 64, true),
    (PrefillKernel::Mma128, "r128", 128, false),
];
const MMA_THREADS: u32 = 128;

/// Dynamic shared memory of the tensor-core kernel: K and V twice, slot rows and positions,
/// and Q unless it lives in registers (its shared copy then borrows the second K/V stage).
fn mma_smem_bytes(head_dim: usize, rows: usize, q_in_regs: bool) -> usize {
    let q = if q_in_regs { 0 } else { rows * head_dim * 2 };
    4 * KEY_TILE * head_dim * 2 + 2 * KEY_TILE * 4 * 2 + q
}

/// The wgmma kernel shapes (prefill_hopper.cu's `PW_KERNEL`s): (kernel, entry-point prefix,
/// query rows per CTA, key slots per tile). A CTA runs a warpgroup (128 threads) per 64 rows.
const WGMMA_SHAPES: [(PrefillKernel, &str, usize, usize); 3] = [
    (PrefillKernel::Wgmma64, "wgmma64", 64, 64),
    (PrefillKernel::Wgmma64K32, "wgmma64k32", 64, 32),
    (PrefillKernel::Wgmma128, "wgmma128", 128, 128),
];

/// `Auto` takes `Wgmma64` for calls whose rows all sit below this position.
const WGMMA64_MAX_POS: u32 = 512;
/// ... and `Wgmma64K32` instead when its CTAs fill every SM (three each) this many times over.
const WGMMA64K32_MIN_WAVES: usize = 8;

/// Dynamic shared memory of the wgmma kernel: Q, K twice, V three times, three slot tables of
/// rows and positions, and 1 KiB to align the swizzle atoms.
fn wgmma_smem_bytes(head_dim: usize, rows: usize, key_tile: usize) -> usize {
    rows * head_dim * 2 + 5 * key_tile * head_dim * 2 + 3 * 2 * key_tile * 4 + 1024
}

impl PrefillKernels {
    pub(crate) fn bind(
        module: &Arc<CudaModule>,
        cc: (i32, i32),
    ) -> std::result::Result<Self, String> {
        let load = |name: String| {
            module
                .load_function(&name)
                .map_err(|e| format!("kernel `{name}` missing: {e}"))
        };
        // A tensor-core kernel with whether its dynamic shared memory limit could be raised to
        // `smem`: a device with less per block refuses, and that kernel is then not used (the
        // generic one runs).
        let load_tc = |name: String, smem: usize| {
            let f = load(name)?;
            let ok = f
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .is_ok();
            Ok::<_, String>((f, ok))
        };
        let mut mma = Vec::new();
        let mut wgmma = Vec::new();
        for dt in [DType::F16, DType::BF16] {
            for d in MMA_DIMS {
                for (_, suffix, rows, q_in_regs) in MMA_SHAPES {
                    let name = format!("prefill_mma_{}_d{d}_{suffix}", dt.name());
                    mma.push(load_tc(name, mma_smem_bytes(d, rows, q_in_regs))?);
                }
                if cc != (9, 0) {
                    continue;
                }
                for (_, prefix, rows, key_tile) in WGMMA_SHAPES {
                    let name = format!("prefill_{prefix}_{}_d{d}", dt.name());
                    wgmma.push(load_tc(name, wgmma_smem_bytes(d, rows, key_tile))?);
                }
            }
        }
        let generic = [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .map(|dt| load(format!("prefill_generic_{}", dt.name())))
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(Self {
            mma,
            wgmma,
            generic,
        })
    }

    /// The tensor-core kernel `kernel` for `dtype` and `head_dim`, if there is one and it can
    /// run, with its rows per CTA, shared memory bytes and threads per CTA.
    fn mma(
        &self,
        dtype: DType,
        head_dim: usize,
        kernel: PrefillKernel,
    ) -> Option<(&CudaFunction, usize, usize, u32)> {
        let t = match dtype {
            DType::F16 => 0,
            DType::BF16 => 1,
            DType::F32 => return None,
        };
        let d = MMA_DIMS.iter().position(|&x| x == head_dim)?;
        if let Some(k) = WGMMA_SHAPES.iter().position(|s| s.0 == kernel) {
            let (_, _, rows, key_tile) = WGMMA_SHAPES[k];
            let (f, ok) = self
                .wgmma
                .get((t * MMA_DIMS.len() + d) * WGMMA_SHAPES.len() + k)?;
            let smem = wgmma_smem_bytes(head_dim, rows, key_tile);
            return ok.then_some((f, rows, smem, 2 * rows as u32));
        }
        let k = MMA_SHAPES.iter().position(|s| s.0 == kernel)?;
        let (_, _, rows, q_in_regs) = MMA_SHAPES[k];
        let (f, ok) = &self.mma[(t * MMA_DIMS.len() + d) * MMA_SHAPES.len() + k];
        ok.then_some((
            f,
            rows,
            mma_smem_bytes(head_dim, rows, q_in_regs),
            MMA_THREADS,
        ))
    }

    fn generic(&self, dtype: DType) -> &CudaFunction {
        &self.generic[match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        }]
    }
}

/// Tiles of at most `size` rows over runs of one sequence, heaviest (latest last position)
/// first: `(row0, nrows, b, min_pos, max_pos)` each, flattened to `TILE_WORDS` words.
fn cut_tiles(rows: &[(u32, u32)], size: usize) -> (usize, Vec<u32>) {
    let mut tiles: Vec<[u32; TILE_WORDS]> = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let b = rows[start].0;
        let end = start
            + rows[start..]
                .iter()
                .take_while(|r| r.0 == b)
                .take(size)
                .count();
        // Row indices fit u32: checked by the caller.
        tiles.push([
            start as u32,
            (end - start) as u32,
            b,
            rows[start].1,
            rows[end - 1].1,
            0,
            0,
            0,
        ]);
        start = end;
    }
    // A sequence's tiles run next to each other, so that its K and V come from DRAM once and
    // from L2 for the rest of its tiles; the heaviest sequence first, and within a sequence the
    // heaviest tile first, so that the grid ends on light tiles.
    let mut last_pos: HashMap<u32, u32> = HashMap::new();
    for t in &tiles {
        let p = last_pos.entry(t[2]).or_default();
        *p = (*p).max(t[4]);
    }
    tiles.sort_by_key(|t| (Reverse(last_pos[&t[2]]), t[2], Reverse(t[4])));
    (tiles.len(), tiles.concat())
}

impl CudaBackend {
    /// Uploads the blocks the GPU pool holds for each sequence of a batch (sequence `b` of the
    /// query rows is `seqs[b]`), checked against `pool`.
    pub fn upload_paged_tables(
        &self,
        pool: &KvPool,
        seqs: &[SeqBlocks],
    ) -> Result<DevicePagedTables> {
        let be = &self.inner;
        let op = "upload_paged_tables";
        be.check(op)?;
        let bt = pool.shape().block_tokens;
        let err = |i: usize, d: String| shape_err(op, format!("sequence {i}: {d}"));
        let mut ids = Vec::new();
        let mut starts = Vec::new();
        let mut seq_first = vec![0u32];
        let mut seq_tokens = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            if s.starts.len() != s.ids.len() {
                return Err(err(
                    i,
                    format!("{} block ids, {} starts", s.ids.len(), s.starts.len()),
                ));
            }
            if !s.ids.is_empty() && !(1..=bt).contains(&s.last_len) {
                return Err(err(
                    i,
                    format!("last block holds {} tokens, not 1..={bt}", s.last_len),
                ));
            }
            if let Some(&id) = s.ids.iter().find(|&&id| id as usize >= pool.n_blocks()) {
                return Err(err(
                    i,
                    format!("block id {id} outside the pool of {}", pool.n_blocks()),
                ));
            }
            for (k, &p) in s.starts.iter().enumerate() {
                if !(p as usize).is_multiple_of(bt) || p as u64 + bt as u64 > u32::MAX as u64 {
                    return Err(err(
                        i,
                        format!("block {k} starts at {p}: not a multiple of {bt} below 2^32"),
                    ));
                }
                if k > 0 && p <= s.starts[k - 1] {
                    return Err(err(
                        i,
                        format!(
                            "block {k} starts at {p}, not after block {} at {}",
                            k - 1,
                            s.starts[k - 1]
                        ),
                    ));
                }
            }
            let tokens =
                u32::try_from(s.tokens(bt)).map_err(|_| err(i, "more than 2^32 tokens".into()))?;
            ids.extend_from_slice(&s.ids);
            starts.extend_from_slice(&s.starts);
            seq_first.push(
                u32::try_from(ids.len()).map_err(|_| shape_err(op, "over 2^32 blocks listed"))?,
            );
            seq_tokens.push(tokens);
        }
        Ok(DevicePagedTables {
            batch: seqs.len(),
            block_tokens: bt,
            max_block_id: ids.iter().copied().max(),
            ids: be.upload(op, &ids)?,
            starts: be.upload(op, &starts)?,
            seq_first: be.upload(op, &seq_first)?,
            seq_tokens: be.upload(op, &seq_tokens)?,
        })
    }

    /// Uploads the query rows of one forward call: `(sequence index, position)` per row; a
    /// sequence's rows consecutive, positions strictly increasing, below `u32::MAX`.
    pub fn upload_query_rows(&self, rows: &[(u32, u32)]) -> Result<DeviceQueryRows> {
        let be = &self.inner;
        let op = "upload_query_rows";
        be.check(op)?;
        if u32::try_from(rows.len()).is_err() {
            return Err(shape_err(op, format!("{} rows exceed u32", rows.len())));
        }
        let mut finished = HashSet::new();
        for (i, w) in rows.windows(2).enumerate() {
            let ((b0, p0), (b1, p1)) = (w[0], w[1]);
            if b0 == b1 && p1 <= p0 {
                return Err(shape_err(
                    op,
                    format!(
                        "rows {i} and {} of sequence {b0}: position {p1} after {p0}",
                        i + 1
                    ),
                ));
            }
            if b0 != b1 && (!finished.insert(b0) || finished.contains(&b1)) {
                return Err(shape_err(
                    op,
                    format!("rows of sequence {b1} (row {}) are not consecutive", i + 1),
                ));
            }
        }
        if let Some(&(b, p)) = rows.iter().find(|r| r.1 == u32::MAX) {
            return Err(shape_err(
                op,
                format!("sequence {b}: position {p} is reserved"),
            ));
        }
        let pos: Vec<u32> = rows.iter().map(|r| r.1).collect();
        let tile_list = |size| -> Result<TileList> {
            let (n, data) = cut_tiles(rows, size);
            Ok(TileList {
                n,
                data: be.upload(op, &data)?,
            })
        };
        Ok(DeviceQueryRows {
            rows: rows.len(),
            max_b: rows.iter().map(|r| r.0).max(),
            max_pos: rows.iter().map(|r| r.1).max(),
            row_pos: be.upload(op, &pos)?,
            tiles64: tile_list(64)?,
            tiles128: tile_list(128)?,
        })
    }

    /// Causal attention of every query row over the blocks `tables` lists for its sequence (see
    /// the module header); `q: [rows, n_heads * head_dim] f32`, the KV geometry from `pool`.
    pub fn prefill_attention(
        &self,
        pool: &KvPool,
        tables: &DevicePagedTables,
        q: &CudaTensor,
        rows: &DeviceQueryRows,
        n_heads: usize,
        scale: f32,
    ) -> Result<DevicePartial> {
        self.prefill_attention_with(pool, tables, q, rows, n_heads, scale, PrefillKernel::Auto)
    }

    /// The kernel `Auto` picks for this call.
    pub fn prefill_kernel(
        &self,
        pool: &KvPool,
        rows: &DeviceQueryRows,
        n_heads: usize,
    ) -> PrefillKernel {
        let be = &self.inner;
        let (dtype, hd) = (pool.dtype(), pool.shape().head_dim);
        let has = |k| self.mma_allowed(pool) && be.prefill.mma(dtype, hd, k).is_some();
        // Mma128 reads each key tile once per 128 rows instead of 64 (and each K/V fragment
        // feeds two mma); Mma64 makes twice the CTAs, for calls too small to fill the GPU.
        let sms = be.info.multiprocessors.max(1) as usize;
        let few = rows.tiles128.n * n_heads < 2 * sms;
        // Wgmma64 (two CTAs per SM) wins where a CTA's few key tiles make its Q loads and O
        // stores a large share of its time: on an H100, 2-17% faster up to 512-token prompts,
        // about even at 1K, 9-19% slower from 2K (`gpu-prefill`, bench/RESULTS.md).
        let short = rows.max_pos.is_some_and(|p| p < WGMMA64_MAX_POS);
        // Wgmma64K32 (three CTAs per SM) wins on many short prompts, where each CTA waits on its
        // loads and more CTAs in flight hide more of it: on an H100 6-10% faster than Wgmma64 at
        // 16 and 64 × 512, level at 4 × 512, 15% slower at 1 × 512 (`gpu-prefill`).
        let many = rows.tiles64.n * n_heads >= WGMMA64K32_MIN_WAVES * 3 * sms;
        match (has(PrefillKernel::Mma64), has(PrefillKernel::Mma128)) {
            _ if short && many && has(PrefillKernel::Wgmma64K32) => PrefillKernel::Wgmma64K32,
            _ if (few || short) && has(PrefillKernel::Wgmma64) => PrefillKernel::Wgmma64,
            _ if has(PrefillKernel::Wgmma128) => PrefillKernel::Wgmma128,
            (true, _) if few => PrefillKernel::Mma64,
            (_, true) => PrefillKernel::Mma128,
            (true, false) => PrefillKernel::Mma64,
            (false, false) => PrefillKernel::Generic,
        }
    }

    /// Whether the tensor-core kernel may run on `pool` (dtype, GPU generation, and pool rows
    /// addressable in 32 bits).
    fn mma_allowed(&self, pool: &KvPool) -> bool {
        let s = pool.shape();
        let pool_rows = pool.n_blocks() as u64 * 2 * s.kv_heads as u64 * s.block_tokens as u64;
        self.inner.info.compute_capability >= (8, 0)
            && pool.dtype() != DType::F32
            && MMA_DIMS.contains(&s.head_dim)
            && pool_rows < u32::MAX as u64
    }

    /// [`CudaBackend::prefill_attention`] with a chosen kernel; a tensor-core kernel the pool
    /// or the GPU does not allow is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention_with(
        &self,
        pool: &KvPool,
        tables: &DevicePagedTables,
        q: &CudaTensor,
        rows: &DeviceQueryRows,
        n_heads: usize,
        scale: f32,
        kernel: PrefillKernel,
    ) -> Result<DevicePartial> {
        let be = &self.inner;
        let op = "prefill_attention";
        be.check(op)?;
        check_prefill(pool, tables, q, rows, n_heads)?;
        let s = pool.shape();
        let (hd, n_rows) = (s.head_dim, rows.rows);
        let kernel = match kernel {
            PrefillKernel::Auto => self.prefill_kernel(pool, rows, n_heads),
            k => k,
        };
        let mma = match kernel {
            PrefillKernel::Generic | PrefillKernel::Auto if hd > GENERIC_MAX_DIM => {
                return Err(shape_err(op, format!("head_dim {hd} > {GENERIC_MAX_DIM}")));
            }
            PrefillKernel::Generic | PrefillKernel::Auto => None,
            k => Some(
                be.prefill
                    .mma(pool.dtype(), hd, k)
                    .filter(|_| self.mma_allowed(pool))
                    .ok_or_else(|| {
                        shape_err(
                            op,
                            format!(
                                "no {k:?} kernel for {} pools of head_dim {hd} on this GPU",
                                pool.dtype().name()
                            ),
                        )
                    })?,
            ),
        };
        let tiles = match mma {
            Some((_, 128, _, _)) => &rows.tiles128,
            _ => &rows.tiles64,
        };
        let ctas = tiles.n * n_heads;
        if ctas > i32::MAX as usize {
            return Err(shape_err(op, format!("{ctas} CTAs exceed one launch")));
        }
        let qb = be.buf(op, q)?;
        let mut o = be.output(op, n_rows * n_heads * hd)?;
        let mut lse = be.output(op, n_rows * n_heads)?;
        if ctas > 0 {
            let u = |x: usize| x as u32;
            let (nh, kvh, d, bt) = (u(n_heads), u(s.kv_heads), u(hd), u(s.block_tokens));
            let scale_log2 = scale * std::f32::consts::LOG2_E;
            let (f, cfg) = match mma {
                Some((f, _, smem, threads)) => (
                    f,
                    LaunchConfig {
                        grid_dim: (u(ctas), 1, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: u(smem),
                    },
                ),
                None => (
                    be.prefill.generic(pool.dtype()),
                    LaunchConfig {
                        grid_dim: (u(ctas), 1, 1),
                        block_dim: (GENERIC_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    },
                ),
            };
            let mut b = be.stream.launch_builder(f);
            b.arg(&mut o).arg(&mut lse).arg(qb);
            match &pool.data {
                PoolBuf::F32(p) => b.arg(p),
                PoolBuf::F16(p) => b.arg(p),
                PoolBuf::BF16(p) => b.arg(p),
            };
            b.arg(&tiles.data)
                .arg(&rows.row_pos)
                .arg(&tables.ids)
                .arg(&tables.starts)
                .arg(&tables.seq_first)
                .arg(&tables.seq_tokens)
                .arg(&nh)
                .arg(&kvh);
            if mma.is_none() {
                b.arg(&d);
            }
            b.arg(&bt).arg(&scale_log2);
            // SAFETY: prefill_mma_* and prefill_wgmma_*(float* o, float* lse, const float* q,
            // const T* pool, const u32* tiles, const u32* row_pos, const u32* blk_ids, const u32*
            // blk_starts, const u32* seq_first, const u32* seq_tokens, u32 n_heads, u32 kv_heads,
            // u32 bt, float scale_log2), and prefill_generic_* the same with u32 head_dim before
            // bt; T is the pool's dtype. `check_prefill` verified the shapes: q and o hold rows *
            // n_heads * head_dim values, lse rows * n_heads; every tile (built at upload) covers
            // rows of one sequence b < the tables' batch; every listed block id is inside the
            // pool, and for the tensor-core kernel every pool row index fits u32 below
            // PF_NONE (`mma_allowed`) and its dynamic shared memory limit was raised at bind;
            // the wgmma kernels exist only where the program was built for compute_90a (9.0).
            unsafe { b.launch(cfg) }.map_err(|e| device_err(op, e))?;
        }
        Ok(DevicePartial {
            o: Inner::tensor(n_rows, n_heads * hd, o),
            lse: Inner::tensor(n_rows, n_heads, lse),
        })
    }
}

fn check_prefill(
    pool: &KvPool,
    tables: &DevicePagedTables,
    q: &CudaTensor,
    rows: &DeviceQueryRows,
    n_heads: usize,
) -> Result<()> {
    let op = "prefill_attention";
    let err = |d: String| Err::<(), KernelError>(shape_err(op, d));
    let s = pool.shape();
    if tables.block_tokens != s.block_tokens {
        return err(format!(
            "tables of {} tokens per block, pool blocks {s:?}",
            tables.block_tokens
        ));
    }
    if n_heads == 0 || !n_heads.is_multiple_of(s.kv_heads) || u32::try_from(n_heads).is_err() {
        return err(format!("{n_heads} heads over {} KV heads", s.kv_heads));
    }
    if (q.rows, q.cols) != (rows.rows, n_heads * s.head_dim) {
        return err(format!(
            "q is [{}, {}], expected [{}, {}]",
            q.rows,
            q.cols,
            rows.rows,
            n_heads * s.head_dim
        ));
    }
    if let Some(b) = rows.max_b
        && b as usize >= tables.batch
    {
        return err(format!(
            "a row of sequence {b}, the tables hold {}",
            tables.batch
        ));
    }
    if let Some(id) = tables.max_block_id
        && id as usize >= pool.n_blocks()
    {
        return err(format!(
            "block id {id} outside the pool of {}",
            pool.n_blocks()
        ));
    }
    Ok(())
}

impl CudaBackend {
    /// Causal prefill attention throughput in TFLOP/s (`4 · heads · head_dim` FLOPs per visible
    /// key): one prompt of `tokens` tokens on Llama-3-8B's geometry (32 query heads, 8 KV heads,
    /// head dim 128) over a `dtype` pool of 32-token blocks, best of `trials` calls after one
    /// warm-up. What the planner charges a prefill's attention FLOPs at.
    pub fn prefill_attention_tflops(
        &self,
        dtype: DType,
        tokens: usize,
        trials: usize,
    ) -> Result<f64> {
        const HEADS: usize = 32;
        let shape = super::KvBlockShape {
            kv_heads: 8,
            block_tokens: 32,
            head_dim: 128,
        };
        let blocks = tokens.div_ceil(shape.block_tokens).max(1);
        let mut pool = self.kv_pool(dtype, shape, blocks)?;
        let seed = blocks.min(64);
        let values = super::calibrate::pseudo_random(seed * shape.block_elems());
        self.kv_pool_write(&mut pool, 0, &values)?;
        self.kv_pool_tile(&mut pool, seed)?;
        let ids: Vec<u32> = (0..blocks as u32).collect();
        let tables = self.upload_paged_tables(
            &pool,
            &[SeqBlocks::contiguous(&ids, tokens, shape.block_tokens)?],
        )?;
        let at: Vec<(u32, u32)> = (0..tokens as u32).map(|p| (0, p)).collect();
        let rows = self.upload_query_rows(&at)?;
        let width = HEADS * shape.head_dim;
        let q = self.upload(tokens, width, &vec![0.01; tokens * width])?;
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let call = || self.prefill_attention(&pool, &tables, &q, &rows, HEADS, scale);
        drop(call()?);
        let mut best = f64::INFINITY;
        for _ in 0..trials.max(1) {
            let (ms, out) = self.time_ms(call)?;
            drop(out);
            best = best.min(ms);
        }
        let visible = (tokens * (tokens + 1) / 2) as f64;
        Ok(4.0 * width as f64 * visible / (best * 1e-3) / 1e12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of sequences with these `(sequence, first position, rows)` chunks, in order.
    fn rows_of(chunks: &[(u32, u32, u32)]) -> Vec<(u32, u32)> {
        chunks
            .iter()
            .flat_map(|&(b, p0, n)| (p0..p0 + n).map(move |p| (b, p)))
            .collect()
    }

    #[test]
    fn tiles_run_sequence_by_sequence_heaviest_first() {
        // Sequence 0: a 100-row chunk from position 0; sequence 1: 300 rows from 0; sequence 2:
        // 64 rows from position 1000 (a later chunk of a long prompt).
        let rows = rows_of(&[(0, 0, 100), (1, 0, 300), (2, 1000, 64)]);
        let (n, data) = cut_tiles(&rows, 64);
        let tiles: Vec<&[u32]> = data.chunks(TILE_WORDS).collect();
        assert_eq!(n, 2 + 5 + 1);
        let order: Vec<(u32, u32)> = tiles.iter().map(|t| (t[2], t[4])).collect();
        assert_eq!(
            order,
            [
                (2, 1063),
                (1, 299),
                (1, 255),
                (1, 191),
                (1, 127),
                (1, 63),
                (0, 99),
                (0, 63)
            ]
        );
        // Every row is in exactly one tile, and a tile's rows are its sequence's, consecutive.
        let mut covered = vec![0; rows.len()];
        for t in &tiles {
            let (row0, nrows) = (t[0] as usize, t[1] as usize);
            assert!((1..=64).contains(&nrows));
            for r in row0..row0 + nrows {
                covered[r] += 1;
                assert_eq!(rows[r].0, t[2]);
            }
            assert_eq!((t[3], t[4]), (rows[row0].1, rows[row0 + nrows - 1].1));
        }
        assert!(covered.iter().all(|&c| c == 1));
    }
}
