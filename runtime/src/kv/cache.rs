//! [`KvCache`]: the block table and tier manager (bookkeeping), and the fan-out of attention to
//! the engine of each tier with the exact LSE merge of their partials.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use half::slice::HalfBitsSliceExt;
use rayon::prelude::*;
use serde::Serialize;
use strata_kernels::attention::{AttentionQuery, attend_batch, split_chunk_blocks};
use strata_kernels::{
    AttentionGeometry, Backend, DType, KvBlockView, KvBuf, KvSlice, KvSliceMut, Partial,
};
use strata_storage::{ArenaSlots, SlotId};

use strata_kernels::CudaTensor;
use strata_kernels::cuda::{DevicePartial, PendingDownload, SeqBlocks as GpuSeqBlocks};

use super::disk::{AttendReply, DiskBlock, DiskGroup, DiskTier, DiskTierConfig, WholeBlock};
use super::far::{self, AttentionRoutes, FarBlock};
use super::gpu::{GpuTier, GpuTierConfig, HiddenPrefetch};
use super::policy::PlacementPolicy;
use super::stored::{slot_kv, slot_kv_mut};
use super::{KvError, KvGeometry, SeqId};

/// Projects hidden states `x: [tokens, d_model]` at their positions back to K and V
/// (`[tokens, kv_heads * head_dim]` each): the layer's own recompute, which the cache calls for
/// hidden states it copied into GPU scratch blocks ([`KvCache::attend_device`]).
pub type RegenKv<'a> =
    &'a dyn Fn(&CudaTensor, &[usize]) -> strata_kernels::Result<(CudaTensor, CudaTensor)>;

pub struct KvCacheConfig {
    pub geometry: KvGeometry,
    /// The dtype the host and disk tiers store K and V in: f32, or the GPU tier's dtype (whose
    /// blocks then move to the host tier as they are), or half precision without a GPU tier
    /// (appends are rounded to nearest even). Hidden states for recompute stay f32.
    pub kv_dtype: DType,
    /// Host tier budget in bytes (rounded down to whole blocks).
    pub host_bytes: u64,
    pub disk: Option<DiskTierConfig>,
    /// The GPU tier (hottest): new blocks go there, and its cold blocks spill to the host tier.
    pub gpu: Option<GpuTierConfig>,
    pub policy: Box<dyn PlacementPolicy>,
}

/// Counters for `--stats-json`: blocks per tier, bytes per link, time per engine.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KvMetrics {
    /// Bytes of one host or disk block (K and V in `kv_dtype`).
    pub bytes_per_block: usize,
    pub kv_dtype: String,
    /// GPU tier: blocks it holds, its peak, and the bytes of one block in its dtype.
    pub gpu_capacity_blocks: usize,
    pub gpu_blocks_peak: usize,
    pub gpu_bytes_per_block: usize,
    pub gpu_kv_dtype: Option<String>,
    /// Blocks moved GPU → host (in the host tier's dtype), and their bytes (the device→host
    /// link).
    pub gpu_spilled_blocks: u64,
    pub bytes_gpu_to_host: u64,
    /// Queries sent down and host/disk partials sent up for GPU-computed layers (host↔device).
    pub bytes_queries_to_host: u64,
    pub bytes_partials_to_gpu: u64,
    pub host_capacity_blocks: usize,
    pub host_blocks_peak: usize,
    pub disk_capacity_blocks: usize,
    pub disk_blocks_peak: usize,
    pub disk_io_engine: Option<String>,
    /// Blocks moved host → disk, and their bytes (the host→disk link).
    pub spilled_blocks: u64,
    pub bytes_host_to_disk: u64,
    /// KV bytes the storage attention engine read from disk (disk→host link).
    pub bytes_disk_to_host: u64,
    /// Bytes of `(o, lse)` partials the storage engine returned instead of the KV.
    pub storage_attention_result_bytes: u64,
    /// KV bytes a computational storage drive would have kept off the host link.
    pub bytes_kept_off_host_link: u64,
    pub host_attention_seconds: f64,
    pub storage_attention_seconds: f64,
    /// Storage attention math: a decode step's summed over the threads that did it beside the
    /// reads, a prompt chunk's the disk worker's time in it.
    pub storage_attention_math_seconds: f64,
    pub disk_write_seconds: f64,
    /// Disk blocks a fetch found already read, queued one fetch ahead
    /// ([`KvCache::prefetch_far`]) while the device computed.
    pub disk_blocks_read_ahead: u64,
    /// Host and disk KV blocks fetched to the compute device (policy `FetchToGpu`/`Split`), and
    /// their bytes.
    pub fetched_blocks: u64,
    pub bytes_fetched: u64,
    /// Fetched blocks the GPU pool had no free block for: attended on the host instead.
    pub fetched_attended_on_host: u64,
    /// Groups of fetched blocks beyond the first that went through the GPU scratch (each one
    /// more copy, launch and LSE merge): fetches larger than the scratch.
    pub scratch_groups: u64,
    /// Prompt blocks written into GPU scratch, attended there and copied down to their host
    /// slots whole ([`KvCache::append_through_scratch`]), and prompt passes that went that way.
    pub blocks_through_scratch: u64,
    pub passes_through_scratch: u64,
    /// With recompute, the rows of those passes whose hidden states came down too (f32, a
    /// token's `d_model` values each): every row of a block that keeps hidden states instead of
    /// K and V (not counted in `blocks_through_scratch`), and of each part-full last block.
    pub hidden_rows_through_scratch: u64,
    /// Recompute: blocks stored as hidden states, their bytes, and the K+V bytes they replaced.
    pub hidden_blocks_stored: u64,
    pub bytes_hidden_stored: u64,
    pub bytes_kv_not_stored: u64,
    /// Hidden-state bytes read back to recompute from, tokens whose K and V were recomputed,
    /// and the K+V bytes regenerated.
    pub bytes_hidden_read: u64,
    pub recomputed_tokens: u64,
    pub bytes_kv_recomputed: u64,
    /// Of `recomputed_tokens`, those whose hidden states a GPU read from host memory one gather
    /// ahead, beside the compute stream ([`KvCache::prefetch_far`]).
    pub recomputed_tokens_read_ahead: u64,
    /// Decode rows whose K and V (and hidden states) came down to their host blocks in the
    /// background ([`KvCache::append_deferred`]).
    pub rows_appended_in_background: u64,
}

enum Loc {
    /// A block of the GPU tier's pool.
    Gpu(u32),
    Host(SlotId),
    /// An index into the disk tier's slots.
    Disk(u32),
}

fn is_host(l: &Loc) -> bool {
    matches!(l, Loc::Host(_))
}

fn is_disk(l: &Loc) -> bool {
    matches!(l, Loc::Disk(_))
}

struct Block {
    loc: Loc,
    filled: usize,
    /// Holds the layer's input hidden states `[block_tokens, d_model] f32` instead of K and V.
    hidden: bool,
}

struct SeqBlocks {
    /// `layers[layer][j]`: block `j` of that layer.
    layers: Vec<Vec<Block>>,
}

/// A sequence's blocks as the GPU sees them in one layer: its GPU-resident blocks `(pool id,
/// first position, tokens)` in position order.
type GpuView = Vec<(u32, usize, usize)>;

/// One query of a batch for one layer: `q: [n_heads, head_dim]` at `pos` of `seq`.
#[derive(Clone, Copy, Debug)]
pub struct TierQuery<'a> {
    pub seq: SeqId,
    pub pos: usize,
    pub q: &'a [f32],
}

/// The distinct sequences of `queries`, sorted, and each one's number of queries in the pass (a
/// prompt chunk has several).
fn seqs_and_rows(queries: &[TierQuery<'_>]) -> (Vec<SeqId>, Vec<usize>) {
    let mut sorted: Vec<SeqId> = queries.iter().map(|q| q.seq).collect();
    sorted.sort_unstable();
    let mut seqs = sorted.clone();
    seqs.dedup();
    let rows = seqs
        .iter()
        .map(|&seq| sorted.partition_point(|&s| s <= seq) - sorted.partition_point(|&s| s < seq))
        .collect();
    (seqs, rows)
}

/// The storage engine's attention of one batch of queries, shipped by
/// [`KvCache::ship_to_storage`]; its partials come with the host tier's ([`TierAttention`]).
pub struct StorageAttending(Receiver<AttendReply>);

/// Host and disk attention for one batch of queries, launched by [`KvCache::attend_begin`]: the
/// host tier's partials are done, the storage engine's may still be streaming.
pub struct TierAttention {
    partials: Vec<Partial>,
    disk: Option<Receiver<AttendReply>>,
}

impl TierAttention {
    /// Whether the storage engine has a part in this attention (its partials may still come).
    pub fn storage_in_flight(&self) -> bool {
        self.disk.is_some()
    }

    /// Waits for the storage engine and merges its partials: one partial per query, in order.
    pub fn join(self) -> Result<Vec<Partial>, KvError> {
        let mut partials = self.partials;
        if let Some(rx) = self.disk {
            for (row, p) in rx.recv().map_err(|_| KvError::WorkerGone)?? {
                partials[row].merge_in(p);
            }
        }
        Ok(partials)
    }
}

pub struct KvCache {
    g: KvGeometry,
    /// The host and disk tiers' K and V dtype, and the bytes of one of their blocks.
    dtype: DType,
    bpb: usize,
    /// Declared before `host`: its copies land in host slots and its page-locking of the host
    /// arena must end before the arena is unmapped.
    gpu: Option<GpuTier>,
    host: ArenaSlots,
    disk: Option<DiskTier>,
    seqs: HashMap<SeqId, SeqBlocks>,
    policy: Box<dyn PlacementPolicy>,
    metrics: KvMetrics,
    /// Where the host and disk tiers' blocks are attended ([`super::far`]).
    routes: AttentionRoutes,
    /// Share of full blocks stored as hidden states, and `d_model` (0: none).
    recompute: f64,
    d_model: usize,
    /// `(seq, layer)` → hidden states `[filled, d_model]` of its writable block, kept while
    /// recompute is on so the block can switch to hidden states once full.
    writable_hidden: HashMap<(SeqId, usize), Vec<f32>>,
    /// A prompt pass appended through the scratch ([`KvCache::append_through_scratch`]): every
    /// block its rows attend is in scratch, for the attention that follows.
    scratch_pass: Option<ScratchPass>,
    /// Blocks coming down from the GPU for their host slots ([`KvCache::land`]): a prompt
    /// pass's new and tail blocks (GPU spills go straight into their slots), oldest first; at most
    /// [`LANDINGS_IN_FLIGHT`].
    landing: VecDeque<Landing>,
    /// Decode rows appended to host blocks whose values are still coming down from the GPU
    /// ([`KvCache::append_deferred`]).
    appending: Option<PendingAppend>,
}

/// Decode rows taken in their host blocks ([`KvCache::append_deferred`]) whose K, V (and hidden
/// states) are still on their way down: row `r` of the downloads goes to `rows[r]`.
struct PendingAppend {
    rows: Vec<TakenRow>,
    k: PendingDownload,
    v: PendingDownload,
    x: Option<PendingDownload>,
}

/// Where a row lands: token `t` of block `j` (host slot `slot`) of `seq` in `layer`.
struct TakenRow {
    seq: SeqId,
    layer: usize,
    j: usize,
    slot: SlotId,
    t: usize,
}

/// Downloads of blocks in flight at once. With one, each pass waited for the previous pass's
/// copy and put its blocks in their slots while the GPU, having nothing queued behind, idled;
/// with two, host threads land one pass while the GPU computes the next.
const LANDINGS_IN_FLIGHT: usize = 2;

/// A GPU spill leaves the blocks of the layer being appended and of this many layers in all
/// (it and the ones after it) for last ([`KvCache::spill_gpu`]): about the time its copy
/// takes to come down (a 1 GB spill of an 8 × 32K prefill against about 11 ms a layer).
const SPILL_SPARED_LAYERS: usize = 4;

/// Blocks on their way down from the GPU: `slots[i]` gets block `i` of the download, and
/// with recompute, the hidden states of the pass's rows that the cache keeps.
struct Landing {
    pending: PendingDownload,
    slots: Vec<SlotId>,
    hidden: Option<HiddenLanding>,
}

impl Landing {
    /// Whether landing this writes host slot `s`.
    fn writes(&self, s: SlotId) -> bool {
        self.slots.contains(&s)
            || self
                .hidden
                .as_ref()
                .is_some_and(|h| h.parts.iter().any(|p| p.slot == Some(s)))
    }
}

/// A prompt pass's hidden states on their way down ([`KvCache::append_through_scratch`] with
/// recompute): the rows of `layer`'s input that the cache keeps, `[rows, d_model]` f32, in the
/// order of `parts`.
struct HiddenLanding {
    pending: PendingDownload,
    layer: usize,
    parts: Vec<HiddenPart>,
}

/// Rows `rows` of a [`HiddenLanding`], the pass's tokens of one block of `seq`, after the
/// hidden states its writable block held before the pass when `after_tail`. With a `slot`, the
/// block is full and chosen for recompute: the slot gets its hidden states instead of K and V.
/// Without, it is the sequence's writable block, and they are kept until it fills (as
/// [`KvCache::append_with_hidden`] keeps them).
struct HiddenPart {
    seq: SeqId,
    rows: std::ops::Range<usize>,
    after_tail: bool,
    slot: Option<SlotId>,
}

/// The blocks of one prompt pass held in the GPU scratch: `(seq, pool id, first position,
/// tokens)`, every block its sequences have in `layer`.
struct ScratchPass {
    layer: usize,
    seqs: Vec<SeqId>,
    blocks: Vec<(SeqId, u32, usize, usize)>,
}

impl KvCache {
    pub fn new(cfg: KvCacheConfig) -> Result<Self, KvError> {
        let g = cfg.geometry;
        let dtype = cfg.kv_dtype;
        if let Some(gpu) = &cfg.gpu
            && gpu.dtype != dtype
            && dtype != DType::F32
        {
            return Err(KvError::Unsupported(format!(
                "a {} host KV tier under a {} GPU tier: the host tier holds the GPU tier's dtype \
                 (or f32)",
                dtype.name(),
                gpu.dtype.name()
            )));
        }
        let bpb = g.bytes_per_block(dtype);
        let stride = g.host_slot_bytes(dtype);
        let slots = (cfg.host_bytes / stride) as usize;
        if slots == 0 {
            return Err(KvError::HostTooSmall {
                capacity: 0,
                needed: g.layers,
            });
        }
        let host = ArenaSlots::with_slots(slots, bpb)?;
        let disk = cfg
            .disk
            .map(|d| DiskTier::open(d, bpb, dtype))
            .transpose()?;
        let gpu = cfg.gpu.map(|c| GpuTier::new(c, &g)).transpose()?;
        let metrics = KvMetrics {
            bytes_per_block: bpb,
            kv_dtype: dtype.name().to_string(),
            gpu_capacity_blocks: gpu.as_ref().map_or(0, GpuTier::capacity),
            gpu_bytes_per_block: gpu.as_ref().map_or(0, GpuTier::bytes_per_block),
            gpu_kv_dtype: gpu.as_ref().map(|t| t.pool.dtype().name().to_string()),
            host_capacity_blocks: host.capacity(),
            disk_capacity_blocks: disk.as_ref().map_or(0, DiskTier::capacity),
            disk_io_engine: disk.as_ref().map(|d| d.engine_name().to_string()),
            ..KvMetrics::default()
        };
        Ok(Self {
            g,
            dtype,
            bpb,
            gpu,
            host,
            disk,
            seqs: HashMap::new(),
            policy: cfg.policy,
            metrics,
            routes: AttentionRoutes::default(),
            recompute: 0.0,
            d_model: 0,
            writable_hidden: HashMap::new(),
            scratch_pass: None,
            landing: VecDeque::new(),
            appending: None,
        })
    }

    /// Sets where cold blocks are attended and the share stored as hidden states of `d_model`
    /// values per token (a planner policy's `attention_*` and `recompute.*`).
    pub fn set_executor(
        &mut self,
        routes: AttentionRoutes,
        recompute: f64,
        d_model: usize,
    ) -> Result<(), KvError> {
        if recompute > 0.0 {
            if self.has_gpu_tier() {
                return Err(KvError::Unsupported(format!(
                    "recompute = {recompute}: storing hidden states with a GPU KV tier is not \
                     built yet (run without --gpu-kv-mem room, or recompute 0)"
                )));
            }
            // Hidden states are kept in f32, K and V in the tier's dtype.
            let need = self.g.block_tokens * d_model * 4;
            if need > self.bpb {
                return Err(KvError::Unsupported(format!(
                    "recompute = {recompute}: this model's hidden states ({d_model} f32 values \
                     per token) take more room than its K and V ({} {} values), so a KV block \
                     cannot hold them; use recompute 0",
                    2 * self.g.kv_heads * self.g.head_dim,
                    self.dtype.name()
                )));
            }
        }
        self.routes = routes;
        self.recompute = recompute;
        self.d_model = d_model;
        Ok(())
    }

    /// Whether the executor stores hidden states (then appends must pass them).
    pub fn wants_hidden(&self) -> bool {
        self.recompute > 0.0
    }

    pub fn geometry(&self) -> KvGeometry {
        self.g
    }

    /// The dtype the host and disk tiers store K and V in.
    pub fn kv_dtype(&self) -> DType {
        self.dtype
    }

    /// K then V of a host block, in the tier's dtype.
    fn host_kv(&self, slot: SlotId) -> KvSlice<'_> {
        slot_kv(&self.host, slot, self.dtype).slice(0..2 * self.g.block_elems())
    }

    pub fn policy(&self) -> &dyn PlacementPolicy {
        self.policy.as_ref()
    }

    /// Current counters, with the disk worker's figures folded in.
    pub fn metrics(&self) -> KvMetrics {
        let mut m = self.metrics.clone();
        if let Some(d) = &self.disk {
            let s = d.stats();
            m.bytes_disk_to_host = s.bytes_read;
            m.storage_attention_result_bytes = s.result_bytes;
            m.bytes_kept_off_host_link = s.bytes_read.saturating_sub(s.result_bytes);
            m.storage_attention_seconds = s.attend_seconds;
            m.storage_attention_math_seconds = s.attend_math_seconds;
            m.disk_write_seconds = s.write_seconds;
            m.disk_blocks_read_ahead = s.blocks_read_ahead;
        }
        m
    }

    pub fn host_blocks_in_use(&self) -> usize {
        self.host.in_use()
    }

    pub fn disk_blocks_in_use(&self) -> usize {
        self.disk.as_ref().map_or(0, DiskTier::in_use)
    }

    pub fn add_sequence(&mut self, seq: SeqId) {
        let layers = (0..self.g.layers).map(|_| Vec::new()).collect();
        self.seqs.insert(seq, SeqBlocks { layers });
    }

    /// Frees every block of `seq`, in every tier.
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<(), KvError> {
        self.settle_host_reads()?;
        self.writable_hidden.retain(|k, _| k.0 != seq);
        let Some(s) = self.seqs.remove(&seq) else {
            return Ok(());
        };
        for b in s.layers.into_iter().flatten() {
            match b.loc {
                Loc::Gpu(i) => {
                    if let Some(t) = &mut self.gpu {
                        t.free(i);
                    }
                }
                Loc::Host(slot) => {
                    // A spill may still be copying into this slot.
                    if let Some(t) = &mut self.gpu {
                        t.settle()?;
                    }
                    self.host.free(slot)?
                }
                Loc::Disk(i) => {
                    if let Some(d) = &mut self.disk {
                        d.free(i);
                    }
                }
            }
        }
        Ok(())
    }

    /// Tokens stored for `(seq, layer)`.
    pub fn len(&self, seq: SeqId, layer: usize) -> usize {
        // Every block but the last is full (blocks fill in order), so this is O(1).
        let blocks = self
            .seqs
            .get(&seq)
            .map_or(&[][..], |s| &s.layers[layer][..]);
        blocks
            .last()
            .map_or(0, |b| (blocks.len() - 1) * self.g.block_tokens + b.filled)
    }

    /// Appends the KV of the token at `pos` (the next position) of `seq` in `layer`;
    /// `k`, `v: [kv_heads, head_dim]`, stored in the tier's dtype (rounded to nearest even when
    /// it is half precision). A token that starts a block gets a new host block, spilling colder
    /// blocks to disk first when the host tier is full.
    pub fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        self.append_with_hidden(seq, layer, pos, k, v, None)
    }

    /// [`KvCache::append`] with the layer's input hidden states `h: [d_model]` of the token, which
    /// a block chosen for recompute keeps instead of K and V once it is full.
    pub fn append_with_hidden(
        &mut self,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
        h: Option<&[f32]>,
    ) -> Result<(), KvError> {
        self.settle_host_reads()?;
        let (slot, t) = self.take_row(seq, layer, pos)?;
        let j = self.seqs.get(&seq).map_or(0, |s| s.layers[layer].len() - 1);
        let row = TakenRow {
            seq,
            layer,
            j,
            slot,
            t,
        };
        self.store_row(&row, k, v, h)
    }

    /// Writes a taken row's K and V into its slot, and keeps its hidden state `h` where the
    /// cache stores hidden states.
    fn store_row(
        &mut self,
        row: &TakenRow,
        k: &[f32],
        v: &[f32],
        h: Option<&[f32]>,
    ) -> Result<(), KvError> {
        let g = self.g;
        store_token(
            &mut slot_kv_mut(&mut self.host, row.slot, self.dtype),
            &g,
            row.t,
            k,
            v,
        );
        if self.recompute > 0.0 {
            self.keep_hidden(row.seq, row.layer, row.j, row.t, row.slot, h)?;
        }
        Ok(())
    }

    /// [`KvCache::append_with_hidden`] for a decode pass's rows (one per sequence) whose K, V and
    /// hidden states `x` are still being computed on the GPU, when there is no GPU KV tier:
    /// the rows' blocks are taken now (so the tables, lengths and which blocks are far are as
    /// after the append), and the values come down in the background and land in their slots
    /// before anything reads those slots (host attention, a gather that fetches them, a spill,
    /// the next append). The thread that issues the GPU's work goes on meanwhile instead of
    /// waiting for the GPU to reach this layer. Returns `false`, having done nothing, where it
    /// does not apply: a GPU KV tier (appends go there), no GPU, a prompt pass, or a row that
    /// fills a block chosen to keep hidden states (that block switches now, and its hidden
    /// states must be in its slot before this layer's gather reads them).
    pub fn append_deferred(
        &mut self,
        layer: usize,
        at: &[(SeqId, usize)],
        k: &CudaTensor,
        v: &CudaTensor,
        x: Option<&CudaTensor>,
    ) -> Result<bool, KvError> {
        let bt = self.g.block_tokens;
        if self.gpu.is_none() || self.has_gpu_tier() || x.is_some() != (self.recompute > 0.0) {
            return Ok(false);
        }
        let mut seen = HashSet::new();
        if !at.iter().all(|&(seq, _)| seen.insert(seq)) {
            return Ok(false);
        }
        for &(seq, pos) in at {
            let blocks = self.layer_blocks(seq, layer)?;
            let t = pos % bt;
            let j = if t == 0 {
                blocks.len()
            } else {
                blocks.len().saturating_sub(1)
            };
            if self.recompute > 0.0 && t + 1 == bt && far::stores_hidden(j, self.recompute) {
                return Ok(false);
            }
        }
        self.land_appends()?;
        let _span = tracing::debug_span!("append_deferred", rows = at.len()).entered();
        let gpu = self.gpu.as_ref().ok_or(KvError::WorkerGone)?;
        let err = |e: strata_kernels::KernelError| KvError::Gpu(e.to_string());
        let be = &gpu.backend;
        let k = be.download_async(k).map_err(err)?;
        let v = be.download_async(v).map_err(err)?;
        let x = x.map(|x| be.download_async(x)).transpose().map_err(err)?;
        // Rows in order; when one fails, the rows before it are appended, as row by row.
        let mut rows = Vec::with_capacity(at.len());
        let mut failed = None;
        for &(seq, pos) in at {
            match self.take_row(seq, layer, pos) {
                Ok((slot, t)) => {
                    let j = self.layer_blocks(seq, layer)?.len() - 1;
                    rows.push(TakenRow {
                        seq,
                        layer,
                        j,
                        slot,
                        t,
                    });
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.metrics.rows_appended_in_background += rows.len() as u64;
        self.appending = Some(PendingAppend { rows, k, v, x });
        match failed {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }

    /// Lands the deferred append ([`KvCache::append_deferred`]): waits for its rows' values and
    /// writes them into their slots (and keeps their hidden states for their blocks), after the
    /// whole blocks still coming down ([`KvCache::land`]: a prompt pass's tail block, whose
    /// download would otherwise overwrite the rows appended to it since).
    fn land_appends(&mut self) -> Result<(), KvError> {
        self.land()?;
        let Some(p) = self.appending.take() else {
            return Ok(());
        };
        let _span = tracing::debug_span!("land_appends", rows = p.rows.len()).entered();
        let gpu = self.gpu.as_ref().ok_or(KvError::WorkerGone)?;
        let err = |e: strata_kernels::KernelError| KvError::Gpu(e.to_string());
        let be = gpu.backend.clone();
        let k = be.wait_download(p.k).map_err(err)?;
        let v = be.wait_download(p.v).map_err(err)?;
        let x = p.x.map(|x| be.wait_download(x)).transpose().map_err(err)?;
        let (kvd, d) = (self.g.kv_heads * self.g.head_dim, self.d_model);
        for (r, row) in p.rows.iter().enumerate() {
            let h = x.as_ref().map(|x| &x[r * d..(r + 1) * d]);
            let (k, v) = (&k[r * kvd..(r + 1) * kvd], &v[r * kvd..(r + 1) * kvd]);
            self.store_row(row, k, v, h)?;
        }
        Ok(())
    }

    /// Appends the KV of many tokens: row `r` is the token at `at[r] = (seq, pos)`, its K and V
    /// `k[r]`, `v[r]` (`[rows, kv_heads * head_dim]` each). The same as [`KvCache::append`] row
    /// by row, but the blocks are taken first and host threads write the values, a block each
    /// (a prefill chunk's rows land in many blocks, and one thread writing them all was most of
    /// a prefill over host KV). Where that could differ from row by row, it is row by row:
    /// hidden states kept for recompute, or fewer free host slots than new blocks (a spill).
    /// On an error the rows before the failing one are appended, as row by row.
    pub fn append_rows(
        &mut self,
        layer: usize,
        at: &[(SeqId, usize)],
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let g = self.g;
        let (bt, kvd) = (g.block_tokens, g.kv_heads * g.head_dim);
        if k.len() != at.len() * kvd || v.len() != at.len() * kvd {
            return Err(KvError::Unsupported(format!(
                "append of {} rows: k has {} values and v {}, expected {} each",
                at.len(),
                k.len(),
                v.len(),
                at.len() * kvd
            )));
        }
        let new_blocks = at.iter().filter(|a| a.1.is_multiple_of(bt)).count();
        let free = self.host.capacity() - self.host.in_use();
        if self.recompute > 0.0 || self.has_gpu_tier() || new_blocks > free {
            for (r, &(seq, pos)) in at.iter().enumerate() {
                let (kr, vr) = (&k[r * kvd..(r + 1) * kvd], &v[r * kvd..(r + 1) * kvd]);
                self.append_with_hidden(seq, layer, pos, kr, vr, None)?;
            }
            return Ok(());
        }
        self.settle_host_reads()?;
        // Blocks first, in row order: (slot, token in the block, row).
        let mut writes: Vec<(SlotId, usize, usize)> = Vec::with_capacity(at.len());
        let mut failed = None;
        for (r, &(seq, pos)) in at.iter().enumerate() {
            match self.take_row(seq, layer, pos) {
                Ok((slot, t)) => writes.push((slot, t, r)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Then the values, a thread per block.
        writes.sort_by_key(|w| w.0.index());
        let mut groups: Vec<(SlotId, std::ops::Range<usize>)> = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            match groups.last_mut() {
                Some((slot, range)) if *slot == w.0 => range.end = i + 1,
                _ => groups.push((w.0, i..i + 1)),
            }
        }
        let ids: Vec<SlotId> = groups.iter().map(|g| g.0).collect();
        let views: Vec<KvSliceMut<'_>> = match self.dtype {
            DType::F32 => self
                .host
                .slots_f32_mut(&ids)?
                .into_iter()
                .map(KvSliceMut::F32)
                .collect(),
            DType::F16 => self
                .host
                .slots_u16_mut(&ids)?
                .into_iter()
                .map(|s| KvSliceMut::F16(s.reinterpret_cast_mut()))
                .collect(),
            DType::BF16 => self
                .host
                .slots_u16_mut(&ids)?
                .into_iter()
                .map(|s| KvSliceMut::BF16(s.reinterpret_cast_mut()))
                .collect(),
        };
        views
            .into_par_iter()
            .zip(groups.par_iter())
            .for_each(|(mut data, (_, range))| {
                for &(_, t, r) in &writes[range.clone()] {
                    let row = r * kvd..(r + 1) * kvd;
                    store_token(&mut data, &g, t, &k[row.clone()], &v[row]);
                }
            });
        failed.map_or(Ok(()), Err)
    }

    /// The host slot and token index that the token at `pos` of `seq` in `layer` goes to (the
    /// next position), a new block when it starts one; counts it as filled. Host tier only.
    fn take_row(
        &mut self,
        seq: SeqId,
        layer: usize,
        pos: usize,
    ) -> Result<(SlotId, usize), KvError> {
        let next = self.len(seq, layer);
        if !self.seqs.contains_key(&seq) {
            return Err(KvError::UnknownSequence(seq));
        }
        if pos != next {
            return Err(KvError::OutOfOrder { seq, pos, next });
        }
        if self.has_gpu_tier() {
            return Err(KvError::Gpu(
                "host append with a GPU tier: the GPU path appends with append_device".into(),
            ));
        }
        if pos.is_multiple_of(self.g.block_tokens) {
            let slot = self.host_slot()?;
            self.seqs
                .get_mut(&seq)
                .ok_or(KvError::UnknownSequence(seq))?
                .layers[layer]
                .push(Block {
                    loc: Loc::Host(slot),
                    filled: 0,
                    hidden: false,
                });
        }
        let block = self
            .seqs
            .get_mut(&seq)
            .and_then(|s| s.layers[layer].last_mut())
            .ok_or(KvError::UnknownSequence(seq))?;
        let Loc::Host(slot) = block.loc else {
            return Err(KvError::Gpu(
                "host append into a GPU-resident block (use append_device with a GPU tier)".into(),
            ));
        };
        block.filled += 1;
        Ok((slot, block.filled - 1))
    }

    /// Collects the writable block's hidden states; when block `j` is full and chosen for
    /// recompute, its slot switches from K and V to them. Its callers have landed every prompt
    /// pass first (`land_appends`), so a pass's hidden states are in the buffer already.
    fn keep_hidden(
        &mut self,
        seq: SeqId,
        layer: usize,
        j: usize,
        t: usize,
        slot: SlotId,
        h: Option<&[f32]>,
    ) -> Result<(), KvError> {
        let d = self.d_model;
        let Some(h) = h.filter(|h| h.len() == d) else {
            return Err(KvError::Unsupported(format!(
                "recompute: the append of layer {layer} carried no hidden states of {d} values"
            )));
        };
        let buf = self.writable_hidden.entry((seq, layer)).or_default();
        if t == 0 {
            buf.clear();
        }
        buf.extend_from_slice(h);
        let bt = self.g.block_tokens;
        if t + 1 < bt || !far::stores_hidden(j, self.recompute) {
            return Ok(());
        }
        let hidden = std::mem::take(buf);
        self.host.slot_f32_mut(slot)[..bt * d].copy_from_slice(&hidden);
        if let Some(b) = self
            .seqs
            .get_mut(&seq)
            .and_then(|s| s.layers[layer].get_mut(j))
        {
            b.hidden = true;
        }
        self.metrics.hidden_blocks_stored += 1;
        self.metrics.bytes_hidden_stored += (bt * d * 4) as u64;
        self.metrics.bytes_kv_not_stored += self.bpb as u64;
        Ok(())
    }

    /// Waits for copies that read host slots straight into GPU scratch
    /// ([`KvCache::attend_device`]), before a host slot is written or freed; and lands the
    /// blocks of a prompt pass still coming down, which would overwrite it, and then the rows
    /// of a deferred append.
    fn settle_host_reads(&mut self) -> Result<(), KvError> {
        self.land_appends()?;
        match &mut self.gpu {
            Some(t) => t.settle_reads(),
            None => Ok(()),
        }
    }

    /// Everything coming down from the GPU into host slots, landed: a spill in flight, and a
    /// prompt pass's blocks ([`KvCache::land`]). Before host slots are read, freed or spilled.
    fn settle_gpu(&mut self) -> Result<(), KvError> {
        self.land()?;
        match &mut self.gpu {
            Some(t) => tracing::debug_span!("settle_spill").in_scope(|| t.settle()),
            None => Ok(()),
        }
    }

    /// Like [`KvCache::settle_gpu`], for the downloads that write any of host slots `slots`
    /// only (and those before them: landings land in order).
    fn settle_gpu_writes(&mut self, slots: &[SlotId]) -> Result<(), KvError> {
        if slots.is_empty() {
            return Ok(());
        }
        // Every decode layer gathers: the set of its reads is built only when some download
        // (a prompt pass's) is in flight.
        if !self.landing.is_empty() {
            let reads: HashSet<SlotId> = slots.iter().copied().collect();
            if let Some(i) = self
                .landing
                .iter()
                .rposition(|l| reads.iter().any(|&s| l.writes(s)))
            {
                self.land_older(self.landing.len() - i - 1)?;
            }
        }
        match &mut self.gpu {
            Some(t) if slots.iter().any(|&s| t.spill_writes(s)) => {
                tracing::debug_span!("settle_spill").in_scope(|| t.settle())
            }
            _ => Ok(()),
        }
    }

    /// Waits for blocks coming down ([`KvCache::append_through_scratch`]) and
    /// copies them into their host slots, a thread per block.
    fn land(&mut self) -> Result<(), KvError> {
        self.land_older(0)
    }

    /// Lands the oldest downloads until at most `keep` are in flight.
    fn land_older(&mut self, keep: usize) -> Result<(), KvError> {
        while self.landing.len() > keep {
            let (Some(l), Some(t)) = (self.landing.pop_front(), self.gpu.as_ref()) else {
                return Ok(());
            };
            let _span = tracing::debug_span!("land_blocks", blocks = l.slots.len()).entered();
            let be = t.backend.clone();
            let bpb = self.bpb;
            let host = &mut self.host;
            be.wait_download_bytes(l.pending, |bytes| {
                let _span = tracing::debug_span!("land_copy", bytes = bytes.len()).entered();
                let views = host.slots_bytes_mut(&l.slots)?;
                views
                    .into_par_iter()
                    .zip(bytes.par_chunks(bpb))
                    .for_each(|(slot, block)| slot[..bpb].copy_from_slice(block));
                Ok::<(), KvError>(())
            })
            .map_err(|e| KvError::Gpu(e.to_string()))??;
            if let Some(h) = l.hidden {
                self.land_hidden(&be, h)?;
            }
        }
        Ok(())
    }

    /// Puts a prompt pass's hidden states where the cache keeps them: into the slots of its
    /// blocks chosen for recompute (after the rows their writable block held before the pass),
    /// a thread per block, and the rows of each sequence's part-full last block into its
    /// writable hidden states.
    fn land_hidden(
        &mut self,
        be: &strata_kernels::cuda::CudaBackend,
        h: HiddenLanding,
    ) -> Result<(), KvError> {
        let _span = tracing::debug_span!("land_hidden", parts = h.parts.len()).entered();
        let d = self.d_model;
        let layer = h.layer;
        // The rows writable blocks held before the pass, taken in order (no part reads one
        // another's).
        let mut before: Vec<Vec<f32>> = Vec::with_capacity(h.parts.len());
        for p in &h.parts {
            before.push(if p.after_tail {
                self.writable_hidden
                    .remove(&(p.seq, layer))
                    .unwrap_or_default()
            } else {
                Vec::new()
            });
        }
        // A block switching to hidden states gets one for each of its tokens, or the rows
        // would land shifted.
        let bt = self.g.block_tokens;
        for (p, held) in h.parts.iter().zip(&before) {
            let rows = held.len() / d + p.rows.len();
            if p.slot.is_some() && rows != bt {
                return Err(KvError::Gpu(format!(
                    "{:?} in layer {layer}: hidden states of {rows} tokens for a block of {bt}",
                    p.seq
                )));
            }
        }
        let to_slots: Vec<SlotId> = h.parts.iter().filter_map(|p| p.slot).collect();
        let host = &mut self.host;
        let writable = &mut self.writable_hidden;
        be.wait_download_with(h.pending, |x| {
            // `to_slots` is the parts with a slot, in order: each takes the next view.
            let mut views = host.slots_f32_mut(&to_slots)?.into_iter();
            let mut jobs = Vec::with_capacity(to_slots.len());
            for (p, mut held) in h.parts.iter().zip(before) {
                let rows = &x[p.rows.start * d..p.rows.end * d];
                if p.slot.is_none() {
                    held.extend_from_slice(rows);
                    writable.insert((p.seq, layer), held);
                } else if let Some(slot) = views.next() {
                    jobs.push((slot, held, rows));
                }
            }
            jobs.into_par_iter().for_each(|(slot, held, rows)| {
                slot[..held.len()].copy_from_slice(&held);
                slot[held.len()..held.len() + rows.len()].copy_from_slice(rows);
            });
            Ok::<(), KvError>(())
        })
        .map_err(|e| KvError::Gpu(e.to_string()))??;
        // The GPU regenerates these blocks from their slots in place (prefetch_hidden, or a
        // kernel over PCIe): page-locking them now, where they were written, keeps that
        // one-time cost in the prefill instead of the first decode step.
        if self.scratch_reads_host_slots()
            && let Some(gpu) = self.gpu.as_mut()
        {
            gpu.page_lock_slots(&mut self.host, &to_slots, bt * d * 4)?;
        }
        Ok(())
    }

    fn host_slot(&mut self) -> Result<SlotId, KvError> {
        if let Some(s) = self.host.alloc() {
            self.note_peaks();
            return Ok(s);
        }
        self.spill()?;
        let slot = self.host.alloc().ok_or_else(|| KvError::HostTooSmall {
            capacity: self.host.capacity(),
            needed: self.seqs.len() * self.g.layers,
        })?;
        self.note_peaks();
        Ok(slot)
    }

    /// Whether the GPU holds KV blocks (appends go there); see [`KvCache::has_gpu_pool`].
    pub fn has_gpu_tier(&self) -> bool {
        self.gpu.as_ref().is_some_and(|t| t.capacity() > 0)
    }

    /// Whether a GPU pool exists to attend in: a GPU tier, or only its scratch (a policy that
    /// keeps no KV on the GPU still attends host and disk blocks there during prefill).
    pub fn has_gpu_pool(&self) -> bool {
        self.gpu.is_some()
    }

    pub fn gpu_blocks_in_use(&self) -> usize {
        self.gpu.as_ref().map_or(0, GpuTier::in_use)
    }

    fn note_peaks(&mut self) {
        self.metrics.gpu_blocks_peak = self.metrics.gpu_blocks_peak.max(self.gpu_blocks_in_use());
        self.metrics.host_blocks_peak = self.metrics.host_blocks_peak.max(self.host.in_use());
        let disk = self.disk_blocks_in_use();
        self.metrics.disk_blocks_peak = self.metrics.disk_blocks_peak.max(disk);
    }

    /// Moves the coldest host blocks (by policy; never a sequence's writable last block) to the
    /// disk tier: reserve disk slots, hand the bytes to the disk worker, free the host slots.
    /// The write itself happens on the worker, overlapping compute.
    fn spill(&mut self) -> Result<(), KvError> {
        // The blocks about to be written to disk may still be landing from the GPU, and their
        // slots, freed below, may still be read by a copy into scratch.
        self.settle_gpu()?;
        self.settle_host_reads()?;
        let bpb = self.bpb;
        let Some(disk) = self.disk.as_mut() else {
            return Err(KvError::HostFull {
                blocks: self.host.capacity(),
                bytes_per_block: bpb,
            });
        };
        let mut candidates: Vec<(u64, SeqId, usize, usize)> = Vec::new();
        for (&seq, s) in &self.seqs {
            for (layer, blocks) in s.layers.iter().enumerate() {
                for (j, b) in blocks
                    .iter()
                    .enumerate()
                    .take(blocks.len().saturating_sub(1))
                {
                    if matches!(b.loc, Loc::Host(_)) {
                        candidates.push((self.policy.keep_rank(j, blocks.len()), seq, layer, j));
                    }
                }
            }
        }
        if candidates.is_empty() {
            return Err(KvError::HostTooSmall {
                capacity: self.host.capacity(),
                needed: self.seqs.len() * self.g.layers + 1,
            });
        }
        candidates.sort_unstable();
        // Spill a batch (1/16 of the tier) so writes are large and spills are rare, but never
        // more than the disk tier has room for: every moved block gets its slot before it moves.
        let room = disk.capacity() - disk.in_use();
        if room == 0 {
            return Err(KvError::DiskFull {
                blocks: disk.capacity(),
                bytes_per_block: bpb,
            });
        }
        let batch = (self.host.capacity() / 16)
            .clamp(1, candidates.len())
            .min(room);
        let t0 = Instant::now();
        let mut writes = Vec::with_capacity(batch);
        for &(_, seq, layer, j) in &candidates[..batch] {
            let Some(block) = self
                .seqs
                .get_mut(&seq)
                .and_then(|s| s.layers[layer].get_mut(j))
            else {
                continue;
            };
            let Loc::Host(hslot) = block.loc else {
                continue;
            };
            let Some(dslot) = disk.reserve() else { break };
            writes.push((dslot, self.host.slot(hslot)[..bpb].to_vec()));
            self.host.free(hslot)?;
            block.loc = Loc::Disk(dslot);
        }
        self.metrics.spilled_blocks += writes.len() as u64;
        self.metrics.bytes_host_to_disk += (writes.len() * bpb) as u64;
        disk.write(writes)?;
        tracing::debug!(
            blocks = batch,
            seconds = t0.elapsed().as_secs_f64(),
            "spilled host -> disk"
        );
        self.note_peaks();
        Ok(())
    }

    /// Attends every query over its sequence's blocks in `layer`, each tier where its blocks
    /// live, and merges the partials. Returns one partial per query, in order.
    pub fn attend(
        &mut self,
        layer: usize,
        queries: &[TierQuery<'_>],
        ag: &AttentionGeometry,
    ) -> Result<Vec<Partial>, KvError> {
        self.attend_begin(layer, queries, ag)?.join()
    }

    /// [`KvCache::attend`] in two halves: ships the disk tier's queries to the storage engine and
    /// attends the host tier (on rayon threads) now; the storage engine's partials are merged
    /// by [`TierAttention::join`], so the caller can compute something else (the next GPU
    /// batch) while the disk worker streams. The host half runs here, not at `join`, because a
    /// later append may spill the blocks it reads.
    pub fn attend_begin(
        &mut self,
        layer: usize,
        queries: &[TierQuery<'_>],
        ag: &AttentionGeometry,
    ) -> Result<TierAttention, KvError> {
        let disk = self.ship_to_storage(layer, queries, ag)?;
        self.attend_host_tier(layer, queries, ag, disk)
    }

    /// The first half of [`KvCache::attend_begin`]: ships the queries of the sequences with disk
    /// blocks in `layer` to the storage engine, which attends them after the work queued before
    /// (commands run in order). `None` when no query has a disk block to attend there.
    pub fn ship_to_storage(
        &mut self,
        layer: usize,
        queries: &[TierQuery<'_>],
        ag: &AttentionGeometry,
    ) -> Result<Option<StorageAttending>, KvError> {
        let (seqs, rows) = seqs_and_rows(queries);
        // Storage attention: ship the queries to the disk worker first, so it streams and
        // attends while the host engine works below.
        let mut groups = Vec::new();
        for (&seq, &n_rows) in seqs.iter().zip(&rows) {
            let blocks = self.layer_blocks(seq, layer)?;
            let far = self.far_mask(blocks, n_rows);
            let disk_blocks: Vec<DiskBlock> = blocks
                .iter()
                .enumerate()
                .filter(|(j, _)| !far[*j])
                .filter_map(|(j, b)| match b.loc {
                    Loc::Disk(slot) => Some(DiskBlock {
                        slot,
                        start_pos: j * self.g.block_tokens,
                        len: b.filled,
                    }),
                    Loc::Host(_) | Loc::Gpu(_) => None,
                })
                .collect();
            if !disk_blocks.is_empty() {
                let rows = queries
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| q.seq == seq)
                    .map(|(i, q)| (i, q.q.to_vec(), q.pos))
                    .collect();
                groups.push(DiskGroup {
                    rows,
                    blocks: disk_blocks,
                });
            }
        }
        Ok(match (&mut self.disk, groups.is_empty()) {
            (Some(d), false) => Some(StorageAttending(d.attend(groups, *ag)?)),
            _ => None,
        })
    }

    /// The second half of [`KvCache::attend_begin`]: attends the host tier for `queries` now and
    /// pairs the partials with the storage engine's attention `disk` shipped for the same queries
    /// ([`KvCache::ship_to_storage`]).
    pub fn attend_host_tier(
        &mut self,
        layer: usize,
        queries: &[TierQuery<'_>],
        ag: &AttentionGeometry,
        disk: Option<StorageAttending>,
    ) -> Result<TierAttention, KvError> {
        let (seqs, rows) = seqs_and_rows(queries);
        // Host attention over host-resident blocks, the rows of a deferred append among them.
        self.settle_gpu()?;
        self.land_appends()?;
        let t0 = Instant::now();
        let views: Vec<Vec<KvBlockView<'_>>> = seqs
            .iter()
            .zip(&rows)
            .map(|(&s, &rows)| self.host_views(s, layer, rows))
            .collect();
        let host_queries: Vec<AttentionQuery<'_>> = queries
            .iter()
            .map(|q| {
                let si = seqs.binary_search(&q.seq).unwrap_or(0);
                AttentionQuery {
                    q: q.q,
                    pos: q.pos,
                    blocks: &views[si],
                }
            })
            .collect();
        let max_blocks = views.iter().map(Vec::len).max().unwrap_or(1);
        let chunk = split_chunk_blocks(max_blocks, queries.len(), rayon::current_num_threads());
        let partials = attend_batch(&host_queries, ag, chunk);
        self.metrics.host_attention_seconds += t0.elapsed().as_secs_f64();

        Ok(TierAttention {
            partials,
            disk: disk.map(|d| d.0),
        })
    }

    /// Per block of one `(seq, layer)`: attended on the compute device (hidden states, or KV the
    /// routes fetch) rather than where it lives. GPU blocks are never far. A sequence with
    /// several rows in the pass (a prompt chunk) has every block far when a GPU pool exists:
    /// the chunk's attention over its spilled earlier chunks is rows × blocks of work, which the
    /// GPU does far faster than the host, so those blocks are fetched whatever the routes say.
    fn far_mask(&self, blocks: &[Block], rows_in_pass: usize) -> Vec<bool> {
        if rows_in_pass > 1 && self.gpu.is_some() {
            return blocks
                .iter()
                .map(|b| !matches!(b.loc, Loc::Gpu(_)))
                .collect();
        }
        let mut mask = vec![false; blocks.len()];
        for (tier_is, near) in [
            (is_host as fn(&Loc) -> bool, self.routes.host_near),
            (is_disk, self.routes.disk_near),
        ] {
            let kv: Vec<usize> = (0..blocks.len())
                .filter(|&j| tier_is(&blocks[j].loc) && !blocks[j].hidden)
                .collect();
            for &j in &kv[far::near_count(kv.len(), near)..] {
                mask[j] = true;
            }
        }
        for (m, b) in mask.iter_mut().zip(blocks) {
            *m |= b.hidden;
        }
        mask
    }

    /// Each sequence's far mask in `layer` ([`KvCache::far_mask`]), or `None` when
    /// [`KvCache::gather_far`] has nothing to gather there: a prompt pass appended through the
    /// scratch, no route that leaves blocks far, or no block in the host or disk tier.
    fn far_masks(
        &self,
        layer: usize,
        seqs: &[(SeqId, usize)],
    ) -> Result<Option<Vec<Vec<bool>>>, KvError> {
        if self
            .scratch_pass
            .as_ref()
            .is_some_and(|p| p.layer == layer && seqs.iter().all(|s| p.seqs.contains(&s.0)))
        {
            // Appended through the scratch: every block these rows attend is there already.
            return Ok(None);
        }
        let prefill_fetches = self.gpu.is_some() && seqs.iter().any(|s| s.1 > 1);
        if self.routes == AttentionRoutes::default() && self.recompute == 0.0 && !prefill_fetches {
            return Ok(None);
        }
        // Only host and disk blocks are ever far. With none anywhere (a GPU-resident run), the
        // masks would all be false: building them cost a 16-sequence decode layer ~30 µs of host
        // time on every layer.
        if self.host.in_use() == 0 && self.disk_blocks_in_use() == 0 {
            return Ok(None);
        }
        seqs.iter()
            .map(|&(seq, rows)| Ok(self.far_mask(self.layer_blocks(seq, layer)?, rows)))
            .collect::<Result<Vec<_>, KvError>>()
            .map(Some)
    }

    /// Queues the disk reads of the next [`KvCache::gather_far`], for `seqs` in `layer`, so the
    /// disk reads them while the device computes this one. A prompt chunk reads every earlier
    /// chunk's disk blocks back, and a fetch policy its cold blocks each step: read one gather
    /// ahead, those reads overlap compute instead of following it. Blocks that move to disk
    /// after this are read when gathered; a gather of something else reads as before.
    pub fn prefetch_far(&mut self, layer: usize, seqs: &[(SeqId, usize)]) -> Result<(), KvError> {
        self.prefetch_hidden(layer, seqs)?;
        if self.disk.is_none() {
            return Ok(());
        }
        let Some(masks) = self.far_masks(layer, seqs)? else {
            return Ok(());
        };
        let mut blocks = Vec::new();
        for (&(seq, _), far) in seqs.iter().zip(&masks) {
            for (b, &far) in self.seqs[&seq].layers[layer].iter().zip(far) {
                if let (true, &Loc::Disk(slot)) = (far, &b.loc) {
                    blocks.push(WholeBlock {
                        slot,
                        hidden: b.hidden,
                    });
                }
            }
        }
        match (&mut self.disk, blocks.is_empty()) {
            (Some(disk), false) => disk.read_ahead(blocks),
            _ => Ok(()),
        }
    }

    /// Whether far host blocks go to the GPU's scratch straight from their slots (a scratch,
    /// and a pool in the host tier's dtype), instead of copied out of the arena first.
    fn scratch_reads_host_slots(&self) -> bool {
        self.gpu
            .as_ref()
            .is_some_and(|t| !t.scratch().is_empty() && t.pool.dtype() == self.dtype)
    }

    /// Starts copying, on the GPU's side stream with the copy engine, the hidden states in host
    /// slots that the next [`KvCache::gather_far`] of `seqs` in `layer` will regenerate in
    /// scratch, so that copy over PCIe runs while the compute stream works through this
    /// gather. The regeneration takes them when its blocks are exactly these (one scratch
    /// group), and otherwise reads its rows itself. Only on a GPU that regenerates in scratch
    /// (see `gather_far`).
    fn prefetch_hidden(&mut self, layer: usize, seqs: &[(SeqId, usize)]) -> Result<(), KvError> {
        if self.recompute == 0.0 || !self.scratch_reads_host_slots() {
            return Ok(());
        }
        let Some(masks) = self.far_masks(layer, seqs)? else {
            return Ok(());
        };
        let (bt, d) = (self.g.block_tokens, self.d_model);
        let mut blocks = Vec::new();
        let mut slots = Vec::new();
        for (&(seq, _), far) in seqs.iter().zip(&masks) {
            for (j, (b, &far)) in self.seqs[&seq].layers[layer].iter().zip(far).enumerate() {
                if let (true, true, &Loc::Host(slot)) = (far, b.hidden, &b.loc) {
                    if b.filled != bt {
                        return Ok(());
                    }
                    blocks.push((seq, j * bt, slot));
                    slots.push(slot);
                }
            }
        }
        if blocks.is_empty() || blocks.len() > self.gpu.as_ref().map_or(0, |t| t.scratch().len()) {
            return Ok(());
        }
        // A prompt pass's hidden states may still be on their way into these slots.
        self.settle_gpu_writes(&slots)?;
        let gpu = self.gpu.as_mut().ok_or(KvError::WorkerGone)?;
        let _span = tracing::debug_span!("prefetch_hidden", blocks = blocks.len()).entered();
        let runs = gpu.slot_runs(&mut self.host, &slots, bt * d * 4)?;
        // SAFETY: every run lies in host slots of the arena, page-locked within one chunk by
        // `slot_runs`, which outlives the tier; `settle_reads` waits for this read (it is in
        // `prefetched` until taken, and a compute mark after its use covers it then) before the
        // cache writes, reuses or frees a host slot.
        let read = unsafe { gpu.backend.copy_host_pieces_beside(&runs, bt, d) }
            .map_err(|e| KvError::Gpu(e.to_string()))?;
        gpu.prefetched.push_back(HiddenPrefetch {
            layer,
            blocks,
            rows: read,
        });
        while gpu.prefetched.len() > 2 {
            gpu.prefetched.pop_front();
        }
        Ok(())
    }

    /// The far blocks of `seqs` in `layer` (see [`KvCache::far_mask`]; each sequence with the
    /// number of rows it has in this pass), copied out of the host tier or read back from the
    /// disk tier, in each sequence's position order. The attention that follows
    /// ([`KvCache::attend_begin`], [`KvCache::attend_device`]) skips them.
    pub fn gather_far(
        &mut self,
        layer: usize,
        seqs: &[(SeqId, usize)],
    ) -> Result<Vec<FarBlock>, KvError> {
        let Some(masks) = self.far_masks(layer, seqs)? else {
            return Ok(Vec::new());
        };
        // A block taken by a deferred append holds its new row only once that lands.
        if let Some(p) = &self.appending {
            let pending = seqs.iter().zip(&masks).any(|(&(seq, _), far)| {
                self.seqs[&seq].layers[layer]
                    .iter()
                    .zip(far)
                    .any(|(b, &far)| {
                        far && matches!(b.loc, Loc::Host(s) if p.rows.iter().any(|r| r.slot == s))
                    })
            });
            if pending {
                self.land_appends()?;
            }
        }
        // Host blocks read below may still be coming down from the GPU. Only the downloads
        // that write them are waited for: the rest stay in flight (this pass's attention must
        // not wait for a spill of blocks it does not read). Landing moves no block, so the far
        // masks hold across it.
        let host_reads: Vec<SlotId> = seqs
            .iter()
            .zip(&masks)
            .flat_map(|(&(seq, _), far)| {
                self.seqs[&seq].layers[layer]
                    .iter()
                    .zip(far)
                    .filter_map(|(b, &far)| match b.loc {
                        Loc::Host(s) if far => Some(s),
                        _ => None,
                    })
            })
            .collect();
        self.settle_gpu_writes(&host_reads)?;
        let (bt, e, d, dtype) = (
            self.g.block_tokens,
            self.g.block_elems(),
            self.d_model,
            self.dtype,
        );
        // Host blocks bound for the GPU's scratch are copied from where they are.
        let in_place = self.scratch_reads_host_slots();
        let mut out = Vec::new();
        let mut disk_reads: Vec<(usize, u32)> = Vec::new();
        for (&(seq, _), far) in seqs.iter().zip(&masks) {
            let blocks = self.layer_blocks(seq, layer)?;
            for (j, b) in blocks.iter().enumerate().filter(|(j, _)| far[*j]) {
                let mut in_host = None;
                let data = match b.loc {
                    // Hidden states too: they stay in their slot until the GPU reads their
                    // rows and regenerates K and V in scratch (`attend_device`).
                    Loc::Host(slot) if in_place => {
                        in_host = Some(slot);
                        KvBuf::with_capacity(dtype, 0)
                    }
                    Loc::Host(slot) if b.hidden => {
                        KvBuf::F32(self.host.slot_f32(slot)[..b.filled * d].to_vec())
                    }
                    Loc::Host(slot) => KvBuf::copy_of(self.host_kv(slot)),
                    Loc::Disk(slot) => {
                        disk_reads.push((out.len(), slot));
                        KvBuf::F32(Vec::new())
                    }
                    Loc::Gpu(_) => continue,
                };
                out.push(FarBlock {
                    seq,
                    in_host,
                    start_pos: j * bt,
                    len: b.filled,
                    hidden: b.hidden,
                    kv_dtype: dtype,
                    data,
                });
            }
        }
        if !disk_reads.is_empty() {
            let disk = self.disk.as_mut().ok_or(KvError::WorkerGone)?;
            let blocks = disk_reads
                .iter()
                .map(|&(i, slot)| WholeBlock {
                    slot,
                    hidden: out[i].hidden,
                })
                .collect();
            for (&(i, _), data) in disk_reads.iter().zip(disk.read(blocks)?) {
                let f = &mut out[i];
                f.data = match data {
                    // A block's hidden states: its filled rows of `d` values.
                    KvBuf::F32(mut h) if f.hidden => {
                        h.truncate(f.len * d);
                        KvBuf::F32(h)
                    }
                    kv => kv,
                };
            }
        }
        for f in &out {
            if f.hidden {
                self.metrics.bytes_hidden_read += (f.len * d * 4) as u64;
            } else {
                self.metrics.fetched_blocks += 1;
                self.metrics.bytes_fetched += match f.in_host {
                    Some(_) => 2 * e * dtype.size_bytes(),
                    None => f.data.size_bytes(),
                } as u64;
            }
        }
        Ok(out)
    }

    /// Counts K and V regenerated from hidden states for `tokens` tokens.
    pub fn note_recomputed(&mut self, tokens: usize) {
        self.metrics.recomputed_tokens += tokens as u64;
        self.metrics.bytes_kv_recomputed +=
            (tokens * 2 * self.g.kv_heads * self.g.head_dim * self.dtype.size_bytes()) as u64;
    }

    fn host_views(&self, seq: SeqId, layer: usize, rows: usize) -> Vec<KvBlockView<'_>> {
        let e = self.g.block_elems();
        let Some(s) = self.seqs.get(&seq) else {
            return Vec::new();
        };
        let far = self.far_mask(&s.layers[layer], rows);
        s.layers[layer]
            .iter()
            .enumerate()
            .filter(|(j, _)| !far[*j])
            .filter_map(|(j, b)| match b.loc {
                Loc::Host(slot) => {
                    let data = self.host_kv(slot);
                    Some(KvBlockView {
                        k: data.slice(0..e),
                        v: data.slice(e..2 * e),
                        start_pos: j * self.g.block_tokens,
                        len: b.filled,
                    })
                }
                Loc::Disk(_) | Loc::Gpu(_) => None,
            })
            .collect()
    }

    /// Appends the K and V of `rows` (each `(seq, pos)`, positions the next of their sequence,
    /// a sequence's rows in order) for `layer` from device tensors `k`, `v: [rows, kv_heads *
    /// head_dim]` into the GPU tier. New blocks come from the GPU tier; when it lacks room, its
    /// coldest blocks spill to the host tier first (all at once, before any slot is handed out,
    /// so no block this call fills can be chosen).
    pub fn append_device(
        &mut self,
        layer: usize,
        rows: &[(SeqId, usize)],
        k: &CudaTensor,
        v: &CudaTensor,
    ) -> Result<(), KvError> {
        let bt = self.g.block_tokens;
        // Check order and count the new blocks this call needs.
        let mut next: HashMap<SeqId, usize> = HashMap::new();
        let mut new_blocks = 0;
        for &(seq, pos) in rows {
            if !self.seqs.contains_key(&seq) {
                return Err(KvError::UnknownSequence(seq));
            }
            let n = next.entry(seq).or_insert_with(|| self.len(seq, layer));
            if pos != *n {
                return Err(KvError::OutOfOrder { seq, pos, next: *n });
            }
            *n += 1;
            if pos.is_multiple_of(bt) {
                new_blocks += 1;
            }
        }
        let Some(gpu) = self.gpu.as_ref() else {
            return Err(KvError::Gpu("append_device without a GPU tier".into()));
        };
        let free = gpu.capacity() - gpu.in_use();
        if new_blocks > free {
            let _span = tracing::debug_span!("spill_gpu").entered();
            self.spill_gpu(layer, new_blocks - free, new_blocks)?;
        }
        let gpu = self.gpu.as_mut().ok_or(KvError::WorkerGone)?;
        let mut slots = Vec::with_capacity(rows.len());
        for &(seq, pos) in rows {
            let blocks = &mut self
                .seqs
                .get_mut(&seq)
                .ok_or(KvError::UnknownSequence(seq))?
                .layers[layer];
            if pos.is_multiple_of(bt) {
                let id = gpu.alloc().ok_or(KvError::GpuTooSmall {
                    capacity: gpu.capacity(),
                    needed: new_blocks,
                    bytes_per_block: gpu.bytes_per_block(),
                })?;
                blocks.push(Block {
                    loc: Loc::Gpu(id),
                    filled: 0,
                    hidden: false,
                });
            }
            let Some(block) = blocks.last_mut() else {
                return Err(KvError::UnknownSequence(seq));
            };
            let Loc::Gpu(id) = block.loc else {
                return Err(KvError::Gpu(format!(
                    "the writable block of {seq:?} in layer {layer} is not on the GPU"
                )));
            };
            slots.push(id * bt as u32 + block.filled as u32);
            block.filled += 1;
        }
        self.note_peaks();
        let gpu = self.gpu.as_mut().ok_or(KvError::WorkerGone)?;
        // Its small uploads wait here for the GPU when the host is far enough ahead.
        let _span = tracing::debug_span!("kv_append").entered();
        gpu.backend
            .kv_append(&mut gpu.pool, k, v, &slots)
            .map_err(|e| KvError::Gpu(e.to_string()))
    }

    /// Appends a prompt pass's K and V on the GPU when there is no GPU tier: `k`, `v: [rows,
    /// kv_heads * head_dim]` on the device, row `r` at `at[r] = (seq, pos)`. Every block the
    /// pass's sequences already hold (host or disk) is fetched into the scratch, the new rows are
    /// written there beside them (into the fetched tail when a sequence's last block is part
    /// full), and the new and tail blocks are copied down to their host slots whole, in the KV
    /// dtype, in the background. The attention that follows ([`KvCache::attend_device`]) reads
    /// them all in scratch, so the prompt's K and V are not read back to the host as f32,
    /// appended there and fetched up again ([`KvCache::append_rows`] and a fetch).
    ///
    /// With recompute, `x` is the layer's input `[rows, d_model]`: the pass's blocks chosen to
    /// keep hidden states get them in their host slots instead of K and V (fewer bytes come
    /// down), and each sequence's part-full last block keeps its rows' hidden states until it
    /// fills, as [`KvCache::append_with_hidden`] does; the pass's own attention reads the K and
    /// V it computed, in scratch.
    ///
    /// Returns `false`, having changed nothing, when the pass does not go this way: a GPU tier
    /// (appends go there), no scratch, a host tier in another dtype than the pool's, recompute
    /// without `x`, or with an earlier chunk's block already kept as hidden states (it would
    /// have to be regenerated here), a sequence with one row in the pass (decode, whose blocks
    /// are attended where the routes say), or more blocks than the scratch or the free host
    /// slots hold.
    pub fn append_through_scratch(
        &mut self,
        layer: usize,
        at: &[(SeqId, usize)],
        k: &CudaTensor,
        v: &CudaTensor,
        x: Option<&CudaTensor>,
    ) -> Result<bool, KvError> {
        let bt = self.g.block_tokens;
        let Some(gpu) = self.gpu.as_ref() else {
            return Ok(false);
        };
        let scratch = gpu.scratch();
        // A host tier in the pool's dtype: a tail block goes back down with its earlier tokens'
        // bytes unchanged.
        let same_dtype = self.dtype == gpu.pool.dtype();
        // A decode step (no sequence with two rows in a row) leaves here, every layer.
        let prompt_pass = at.windows(2).any(|w| w[0].0 == w[1].0);
        let recompute = self.recompute > 0.0;
        if !prompt_pass
            || gpu.capacity() > 0
            || scratch.is_empty()
            || (recompute && x.is_none_or(|x| gpu.backend.shape(x) != (at.len(), self.d_model)))
            || !same_dtype
        {
            return Ok(false);
        }
        // Sequences in order of first appearance with their rows in the pass, and where each
        // starts; positions checked as any append checks them.
        let mut seqs: Vec<(SeqId, usize)> = Vec::new();
        let mut first: HashMap<SeqId, usize> = HashMap::new();
        let mut next: HashMap<SeqId, usize> = HashMap::new();
        let mut new_blocks = 0;
        for &(seq, pos) in at {
            if !self.seqs.contains_key(&seq) {
                return Err(KvError::UnknownSequence(seq));
            }
            let n = next.entry(seq).or_insert_with(|| {
                let len = self.len(seq, layer);
                first.insert(seq, len);
                seqs.push((seq, 0));
                len
            });
            if pos != *n {
                return Err(KvError::OutOfOrder { seq, pos, next: *n });
            }
            *n += 1;
            new_blocks += usize::from(pos.is_multiple_of(bt));
        }
        for (seq, rows) in &mut seqs {
            *rows = next[seq] - first[seq];
        }
        let mut held = 0;
        for &(seq, rows) in &seqs {
            let blocks = self.layer_blocks(seq, layer)?;
            if rows < 2
                || blocks
                    .iter()
                    .any(|b| matches!(b.loc, Loc::Gpu(_)) || b.hidden)
            {
                return Ok(false);
            }
            held += blocks.len();
        }
        let free_host = self.host.capacity() - self.host.in_use();
        if held + new_blocks > scratch.len() || new_blocks > free_host {
            return Ok(false);
        }
        let _span = tracing::debug_span!("append_through_scratch", rows = at.len()).entered();
        // Every block held, into scratch (all of them are far for a pass of several rows).
        let far = self.gather_far(layer, &seqs)?;
        let mut blocks = if far.is_empty() {
            Vec::new()
        } else {
            self.import_scratch(layer, &far, None)?
        };
        // The new blocks' host slots, all free (so no spill moves a block not yet written).
        let mut slots = Vec::with_capacity(new_blocks);
        for _ in 0..new_blocks {
            slots.push(self.host.alloc().ok_or(KvError::HostTooSmall {
                capacity: self.host.capacity(),
                needed: new_blocks,
            })?);
        }
        let mut slots = slots.into_iter();
        let mut index: HashMap<(SeqId, usize), usize> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| ((b.0, b.2), i))
            .collect();
        let mut next_id = scratch.start + blocks.len() as u32;
        let mut row_slots = Vec::with_capacity(at.len());
        // Blocks going down: (scratch id, host slot); with recompute, for each also its sequence,
        // index in the layer, whether it was the writable block before the pass, and the
        // pass's rows in it.
        let mut moves: Vec<(u32, SlotId)> = Vec::new();
        let mut moved: Vec<(SeqId, usize, bool, Vec<usize>)> = Vec::new();
        let mut move_of: HashMap<(SeqId, usize), usize> = HashMap::new();
        for (r, &(seq, pos)) in at.iter().enumerate() {
            let start = pos - pos % bt;
            let layer_blocks = &mut self
                .seqs
                .get_mut(&seq)
                .ok_or(KvError::UnknownSequence(seq))?
                .layers[layer];
            if pos == start {
                let slot = slots.next().ok_or(KvError::WorkerGone)?;
                layer_blocks.push(Block {
                    loc: Loc::Host(slot),
                    filled: 0,
                    hidden: false,
                });
                index.insert((seq, start), blocks.len());
                blocks.push((seq, next_id, start, 0));
                if recompute {
                    move_of.insert((seq, start), moves.len());
                    moved.push((seq, layer_blocks.len() - 1, false, Vec::new()));
                }
                moves.push((next_id, slot));
                next_id += 1;
            }
            let i = *index.get(&(seq, start)).ok_or_else(|| {
                KvError::Gpu(format!("no scratch block for {seq:?} at position {start}"))
            })?;
            let j = layer_blocks.len().saturating_sub(1);
            let Some(Block {
                loc: Loc::Host(slot),
                filled,
                ..
            }) = layer_blocks.last_mut()
            else {
                return Err(KvError::Gpu(format!(
                    "the writable block of {seq:?} in layer {layer} is not in host memory"
                )));
            };
            if pos == first[&seq] && pos != start {
                // The part-full tail goes down whole with the rows added to it.
                if recompute {
                    move_of.insert((seq, start), moves.len());
                    moved.push((seq, j, true, Vec::new()));
                }
                moves.push((blocks[i].1, *slot));
            }
            if recompute && let Some(&m) = move_of.get(&(seq, start)) {
                moved[m].3.push(r);
            }
            *filled += 1;
            row_slots.push(blocks[i].1 * bt as u32 + (pos - start) as u32);
            blocks[i].3 += 1;
        }
        // With recompute: which blocks come down as hidden states instead of K and V, and the
        // rows of x that go down (each block's in turn).
        let mut parts = Vec::new();
        let mut x_rows = Vec::new();
        if recompute {
            let mut kept = Vec::with_capacity(moves.len());
            for (mv, (seq, j, after_tail, rows)) in moves.into_iter().zip(moved) {
                let blocks = &mut self
                    .seqs
                    .get_mut(&seq)
                    .ok_or(KvError::UnknownSequence(seq))?
                    .layers[layer];
                let last = j + 1 == blocks.len();
                let b = &mut blocks[j];
                let full = b.filled == bt;
                let to_slot = full && far::stores_hidden(j, self.recompute);
                if to_slot || (last && !full) {
                    let range = x_rows.len()..x_rows.len() + rows.len();
                    x_rows.extend_from_slice(&rows);
                    parts.push(HiddenPart {
                        seq,
                        rows: range,
                        after_tail,
                        slot: to_slot.then_some(mv.1),
                    });
                }
                if to_slot {
                    b.hidden = true;
                    self.metrics.hidden_blocks_stored += 1;
                    self.metrics.bytes_hidden_stored += (bt * self.d_model * 4) as u64;
                    self.metrics.bytes_kv_not_stored += self.bpb as u64;
                } else {
                    kept.push(mv);
                }
            }
            moves = kept;
        }
        // The pass before last has landed; the last may still be coming down.
        self.land_older(LANDINGS_IN_FLIGHT - 1)?;
        let gpu = self.gpu.as_mut().ok_or(KvError::WorkerGone)?;
        let err = |e: strata_kernels::KernelError| KvError::Gpu(e.to_string());
        gpu.backend
            .kv_append(&mut gpu.pool, k, v, &row_slots)
            .map_err(err)?;
        let hidden = match x {
            Some(x) if !parts.is_empty() => {
                let rows = gpu.backend.gather_rows(x, &x_rows).map_err(err)?;
                Some(HiddenLanding {
                    pending: gpu.backend.download_tensor_async(rows).map_err(err)?,
                    layer,
                    parts,
                })
            }
            _ => None,
        };
        let ids: Vec<u32> = moves.iter().map(|m| m.0).collect();
        let pending = gpu
            .backend
            .kv_blocks_download_async(&gpu.pool, &ids)
            .map_err(err)?;
        self.landing.push_back(Landing {
            pending,
            slots: moves.iter().map(|m| m.1).collect(),
            hidden,
        });
        self.metrics.blocks_through_scratch += moves.len() as u64;
        self.metrics.hidden_rows_through_scratch += x_rows.len() as u64;
        self.metrics.passes_through_scratch += 1;
        self.metrics.bytes_gpu_to_host +=
            (moves.len() * self.bpb + x_rows.len() * self.d_model * 4) as u64;
        self.scratch_pass = Some(ScratchPass {
            layer,
            seqs: seqs.iter().map(|s| s.0).collect(),
            blocks,
        });
        self.note_peaks();
        Ok(true)
    }

    /// Moves at least `need` of the coldest GPU blocks (by policy; never a sequence's writable
    /// last block) to the host tier, in a batch of 1/16 of the tier when there are enough, for
    /// an append into `layer`. `wanted` is what the caller asked for, for the error when the
    /// tier cannot make room.
    fn spill_gpu(&mut self, layer: usize, need: usize, wanted: usize) -> Result<(), KvError> {
        let Some(gpu) = self.gpu.as_ref() else {
            return Ok(());
        };
        let capacity = gpu.capacity();
        let mut candidates: Vec<(u64, SeqId, usize, usize)> = Vec::new();
        for (&seq, s) in &self.seqs {
            for (layer, blocks) in s.layers.iter().enumerate() {
                for (j, b) in blocks
                    .iter()
                    .enumerate()
                    .take(blocks.len().saturating_sub(1))
                {
                    if matches!(b.loc, Loc::Gpu(_)) {
                        candidates.push((self.policy.keep_rank(j, blocks.len()), seq, layer, j));
                    }
                }
            }
        }
        if candidates.len() < need {
            return Err(KvError::GpuTooSmall {
                capacity,
                needed: wanted + (self.gpu_blocks_in_use() - candidates.len()),
                bytes_per_block: gpu.bytes_per_block(),
            });
        }
        candidates.sort_unstable();
        let batch = (capacity / 16).clamp(need, candidates.len());
        // Among the coldest two batches, blocks of the layers attended next (this one and the
        // few after it) go last: their attention would otherwise wait for this spill to come
        // down, while another layer's blocks have landed long before that layer comes round.
        let layers = self.g.layers;
        let soon = |l: usize| (l + layers - layer) % layers < SPILL_SPARED_LAYERS;
        let window = candidates.len().min(2 * batch);
        candidates[..window].sort_by_key(|c| soon(c.2));
        let t0 = Instant::now();
        // Take every host slot before any block changes tier: taking one may spill host blocks
        // to disk, and a block moved here is not in host memory until its export lands.
        let take = tracing::debug_span!("take_host_slots").entered();
        let mut slots = Vec::with_capacity(batch);
        while slots.len() < batch {
            match self.host_slot() {
                Ok(s) => slots.push(s),
                Err(_) if slots.len() >= need => break,
                Err(e) => {
                    for s in slots {
                        self.host.free(s)?;
                    }
                    return Err(e);
                }
            }
        }
        drop(take);
        let mut moves = Vec::with_capacity(slots.len());
        for (&(_, seq, layer, j), slot) in candidates.iter().zip(slots) {
            let block = self
                .seqs
                .get_mut(&seq)
                .and_then(|s| s.layers[layer].get_mut(j));
            match block {
                Some(Block {
                    loc: loc @ Loc::Gpu(_),
                    ..
                }) => {
                    let Loc::Gpu(id) = *loc else { continue };
                    *loc = Loc::Host(slot);
                    moves.push((id, slot));
                }
                _ => self.host.free(slot)?,
            }
        }
        // The copy engine writes the blocks straight into their slots (page-locked ahead of use
        // by the tier's pinning thread), in the pool's dtype or widened to f32: no host thread
        // touches them on the way.
        let gpu = self.gpu.as_mut().ok_or(KvError::WorkerGone)?;
        tracing::debug_span!("export")
            .in_scope(|| gpu.export(&mut self.host, &moves, self.dtype))?;
        for &(id, _) in &moves {
            gpu.free(id);
        }
        self.metrics.gpu_spilled_blocks += moves.len() as u64;
        self.metrics.bytes_gpu_to_host += (moves.len() * self.bpb) as u64;
        tracing::debug!(
            blocks = moves.len(),
            seconds = t0.elapsed().as_secs_f64(),
            "spilled gpu -> host"
        );
        self.note_peaks();
        Ok(())
    }

    /// Whether the host attends any block of `seqs` in `layer` near the data (each sequence
    /// with its rows in this pass): one outside the GPU that is not fetched
    /// ([`KvCache::far_mask`]). Fetched blocks the GPU cannot take are
    /// [`KvCache::fetch_overflows`].
    pub fn host_attends(&self, layer: usize, seqs: &[(SeqId, usize)]) -> Result<bool, KvError> {
        for &(seq, rows) in seqs {
            let blocks = self.layer_blocks(seq, layer)?;
            // Cheap first: a GPU-resident sequence (the common decode case) needs no mask.
            if blocks.iter().all(|b| matches!(b.loc, Loc::Gpu(_))) {
                continue;
            }
            let far = self.far_mask(blocks, rows);
            let near = |(j, b): (usize, &Block)| !matches!(b.loc, Loc::Gpu(_)) && !far[j];
            if blocks.iter().enumerate().any(near) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Launches the GPU's half of a layer's attention: `q: [rows, n_heads * head_dim]` on the
    /// device, row `r` at `rows[r] = (seq, pos)`. GPU-resident blocks are attended on the device
    /// (the split-KV decode kernel when every row is its sequence's only and newest token, else
    /// the causal prefill kernel) and the partials `(o, lse)` returned, still being computed;
    /// blocks in the host and disk tiers are left to [`KvCache::attend_begin`], whose partials
    /// the caller merges with these.
    ///
    /// `far` (from [`KvCache::gather_far`]: host and disk blocks fetched to the GPU) go through
    /// the pool's scratch blocks a group at a time: the first group attended with the
    /// GPU-resident blocks, each further one on its own, their partials merged by LSE. Scratch
    /// blocks are reused once the kernels are enqueued: later writes into them are ordered
    /// after those kernels on the compute stream. A pool without scratch takes them into free
    /// blocks one by one, and returns those it has no room for, for the host to attend with the
    /// near blocks (`fetched_attended_on_host` counts them). A pass appended through the
    /// scratch ([`KvCache::append_through_scratch`]) is attended over the blocks already there.
    pub fn attend_device(
        &mut self,
        layer: usize,
        rows: &[(SeqId, usize)],
        q: &CudaTensor,
        ag: &AttentionGeometry,
        mut far: Vec<FarBlock>,
        regen: RegenKv<'_>,
    ) -> Result<(Option<DevicePartial>, Vec<FarBlock>), KvError> {
        if let Some(pass) = self.scratch_pass.take() {
            if pass.layer != layer
                || !far.is_empty()
                || rows.iter().any(|r| !pass.seqs.contains(&r.0))
            {
                return Err(KvError::Gpu(format!(
                    "attention in layer {layer} after a pass appended through scratch in layer {}",
                    pass.layer
                )));
            }
            let out = self.attend_gpu_blocks(layer, rows, q, ag, &pass.blocks, false)?;
            return Ok((Some(out), far));
        }
        if far.is_empty() && !self.any_on_gpu(layer, rows)? {
            return Ok((None, far));
        }
        let group = self.gpu.as_ref().map_or(0, |t| t.scratch().len());
        if group == 0 {
            // No scratch: into free pool blocks one by one, the rest left to the host.
            let pooled = self.import_far(&far)?;
            let leftover = far.split_off(pooled.len());
            self.metrics.fetched_attended_on_host += leftover.len() as u64;
            let out = self.attend_gpu_blocks(layer, rows, q, ag, &pooled, true);
            if let Some(gpu) = self.gpu.as_mut() {
                for &(_, id, _, _) in &pooled {
                    gpu.free(id);
                }
            }
            return Ok((Some(out?), leftover));
        }
        // Through scratch: one copy per group (host blocks straight from the arena).
        let mut groups = far.chunks(group);
        let first = match groups.next() {
            Some(g) => self.import_scratch(layer, g, Some(regen))?,
            None => Vec::new(),
        };
        let mut parts = vec![self.attend_gpu_blocks(layer, rows, q, ag, &first, true)?];
        for g in groups {
            let ids = self.import_scratch(layer, g, Some(regen))?;
            parts.push(self.attend_gpu_blocks(layer, rows, q, ag, &ids, false)?);
        }
        self.metrics.scratch_groups += parts.len() as u64 - 1;
        let out = if parts.len() == 1 {
            parts.swap_remove(0)
        } else {
            self.merge_device_partials(&parts)?
        };
        Ok((Some(out), Vec::new()))
    }

    /// Whether `n` fetched blocks leave some for the host ([`KvCache::attend_device`]): no GPU
    /// pool, or no scratch and fewer free pool blocks than `n`.
    pub fn fetch_overflows(&self, n: usize) -> bool {
        match &self.gpu {
            None => n > 0,
            Some(t) => t.scratch().is_empty() && n > t.capacity() - t.in_use(),
        }
    }

    /// The blocks of `seq` in `layer`, in position order.
    fn layer_blocks(&self, seq: SeqId, layer: usize) -> Result<&[Block], KvError> {
        Ok(&self
            .seqs
            .get(&seq)
            .ok_or(KvError::UnknownSequence(seq))?
            .layers[layer])
    }

    /// Whether a sequence of `rows` has a block of `layer` in the GPU tier.
    fn any_on_gpu(&self, layer: usize, rows: &[(SeqId, usize)]) -> Result<bool, KvError> {
        let mut seqs: Vec<SeqId> = rows.iter().map(|r| r.0).collect();
        seqs.dedup();
        for seq in seqs {
            let blocks = self.layer_blocks(seq, layer)?;
            if blocks.iter().any(|b| matches!(b.loc, Loc::Gpu(_))) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn merge_device_partials(&self, parts: &[DevicePartial]) -> Result<DevicePartial, KvError> {
        let gpu = self
            .gpu
            .as_ref()
            .ok_or_else(|| KvError::Gpu("merge without a GPU pool".into()))?;
        let refs: Vec<&DevicePartial> = parts.iter().collect();
        gpu.backend
            .merge_partials(&refs)
            .map_err(|e| KvError::Gpu(e.to_string()))
    }

    /// Counts the bytes of one host round trip of tiered attention: queries down, partials up.
    pub fn note_host_round_trip(&mut self, query_bytes: u64, partial_bytes: u64) {
        self.metrics.bytes_queries_to_host += query_bytes;
        self.metrics.bytes_partials_to_gpu += partial_bytes;
    }

    /// Copies fetched blocks, in order, into free GPU pool blocks while there are any:
    /// `(seq, pool id, start, len)` for each block copied (a prefix of `far`).
    fn import_far(&mut self, far: &[FarBlock]) -> Result<Vec<(SeqId, u32, usize, usize)>, KvError> {
        let Some(gpu) = self.gpu.as_mut() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(far.len());
        for f in far {
            let Some(id) = gpu.alloc() else {
                break;
            };
            out.push((f.seq, id, f.start_pos, f.len));
            gpu.backend
                .kv_pool_write_blocks_async(&mut gpu.pool, id as usize, &[f.data.as_slice()])
                .map_err(|e| KvError::Gpu(e.to_string()))?;
        }
        self.note_peaks();
        Ok(out)
    }

    /// Copies `far` (at most the scratch's size) into the scratch blocks: blocks in hand in
    /// one transfer, host blocks left in place straight from the arena. Returns `(seq, pool id,
    /// start, len)` for each.
    fn import_scratch(
        &mut self,
        layer: usize,
        far: &[FarBlock],
        regen: Option<RegenKv<'_>>,
    ) -> Result<Vec<(SeqId, u32, usize, usize)>, KvError> {
        let _span = tracing::debug_span!("import_scratch", blocks = far.len()).entered();
        let gpu = self
            .gpu
            .as_mut()
            .ok_or_else(|| KvError::Gpu("scratch without a GPU pool".into()))?;
        let ids = gpu.scratch();
        if far.len() > ids.len() {
            return Err(KvError::Gpu(format!(
                "{} fetched blocks for {} scratch blocks",
                far.len(),
                ids.len()
            )));
        }
        // Blocks in hand first, then K and V still in host slots, then hidden states still in
        // host slots (read in place and regenerated into their scratch blocks).
        let (in_host, in_hand): (Vec<&FarBlock>, Vec<&FarBlock>) =
            far.iter().partition(|f| f.in_host.is_some());
        let (hidden, in_host): (Vec<&FarBlock>, Vec<&FarBlock>) =
            in_host.into_iter().partition(|f| f.hidden);
        let e = 2 * self.g.block_elems();
        let data: Vec<_> = in_hand
            .iter()
            .map(|f| f.data.as_slice().slice(0..e))
            .collect();
        // Without waiting for the device: the host goes on to the next gather meanwhile.
        gpu.backend
            .kv_pool_write_blocks_async(&mut gpu.pool, ids.start as usize, &data)
            .map_err(|e| KvError::Gpu(e.to_string()))?;
        let slots: Vec<SlotId> = in_host.iter().filter_map(|f| f.in_host).collect();
        gpu.fetch_slots(&mut self.host, ids.start + in_hand.len() as u32, &slots)?;
        let placed: Vec<(&FarBlock, u32)> = in_hand
            .into_iter()
            .chain(in_host)
            .chain(hidden)
            .zip(ids)
            .collect();
        let hidden: Vec<(&FarBlock, u32)> =
            placed.iter().copied().filter(|(f, _)| f.hidden).collect();
        if !hidden.is_empty() {
            let regen = regen.ok_or_else(|| {
                KvError::Gpu(
                    "hidden states bound for scratch with no layer to regenerate them".into(),
                )
            })?;
            self.regenerate_in_scratch(layer, &hidden, regen)?;
        }
        Ok(placed
            .into_iter()
            .map(|(f, id)| (f.seq, id, f.start_pos, f.len))
            .collect())
    }

    /// Turns hidden states still in host slots into K and V in the scratch blocks given them,
    /// `(block, scratch id)`, in one batch on the compute stream. Each token's row of `d_model`
    /// f32 values (those bytes only, not the rest of the slot) was copied ahead by the copy
    /// engine ([`KvCache::prefetch_far`]) when these are the blocks it copied; otherwise a
    /// kernel reads the rows straight from the page-locked slots over PCIe. `regen` projects
    /// the rows, and the K and V rows are appended into the scratch blocks (rounded to the
    /// pool's dtype, as the first append was). Nothing comes back to the host.
    fn regenerate_in_scratch(
        &mut self,
        layer: usize,
        hidden: &[(&FarBlock, u32)],
        regen: RegenKv<'_>,
    ) -> Result<(), KvError> {
        let _span = tracing::debug_span!("regenerate_in_scratch", blocks = hidden.len()).entered();
        let err = |e: strata_kernels::KernelError| KvError::Gpu(e.to_string());
        let (bt, d) = (self.g.block_tokens, self.d_model);
        let gpu = self
            .gpu
            .as_mut()
            .ok_or_else(|| KvError::Gpu("scratch without a GPU pool".into()))?;
        let mut slots: Vec<(SlotId, usize)> = Vec::with_capacity(hidden.len());
        let mut key = Vec::with_capacity(hidden.len());
        for (f, _) in hidden {
            let slot = f.in_host.ok_or_else(|| {
                KvError::Gpu("a hidden block bound for scratch is not in a host slot".into())
            })?;
            slots.push((slot, f.len));
            key.push((f.seq, f.start_pos, slot));
        }
        let tokens: usize = hidden.iter().map(|(f, _)| f.len).sum();
        let (mut positions, mut at) = (Vec::with_capacity(tokens), Vec::with_capacity(tokens));
        for &(f, id) in hidden {
            positions.extend(f.start_pos..f.start_pos + f.len);
            at.extend((0..f.len as u32).map(|t| id * bt as u32 + t));
        }
        let be = gpu.backend.clone();
        // Read ahead for exactly these blocks? Reads before it are stale; one after it is the
        // next gather's.
        let ahead = match gpu
            .prefetched
            .iter()
            .position(|p| p.layer == layer && p.blocks == key)
        {
            Some(i) => {
                gpu.prefetched.drain(..i);
                gpu.prefetched.pop_front()
            }
            None => None,
        };
        let (k, v) = match &ahead {
            Some(p) => {
                let x = p.rows.ready().map_err(err)?;
                self.metrics.recomputed_tokens_read_ahead += tokens as u64;
                regen(x, &positions).map_err(err)?
            }
            None => {
                let rows = gpu.mapped_rows(&mut self.host, &slots, d * 4)?;
                // SAFETY: every row address lies in a host slot of the arena, page-locked and
                // mapped by `mapped_rows`; the arena outlives the tier, and `mark_reads` below
                // makes the cache wait for this read before it writes, reuses or frees any of
                // these slots.
                let x = unsafe { be.gather_rows_f32(&rows, d) }.map_err(err)?;
                regen(&x, &positions).map_err(err)?
            }
        };
        // After the read (on the compute stream, or waited for by it): covers either.
        gpu.mark_reads()?;
        drop(ahead);
        be.kv_append(&mut gpu.pool, &k, &v, &at).map_err(err)?;
        self.note_recomputed(tokens);
        Ok(())
    }

    /// The device partials of `rows` over `fetched` blocks (copied into the pool), with their
    /// sequences' GPU-resident blocks when `with_resident`.
    fn attend_gpu_blocks(
        &self,
        layer: usize,
        rows: &[(SeqId, usize)],
        q: &CudaTensor,
        ag: &AttentionGeometry,
        fetched: &[(SeqId, u32, usize, usize)],
        with_resident: bool,
    ) -> Result<DevicePartial, KvError> {
        let err = |e: strata_kernels::KernelError| KvError::Gpu(e.to_string());
        let bt = self.g.block_tokens;
        let gpu = self
            .gpu
            .as_ref()
            .ok_or_else(|| KvError::Gpu("attend_device without a GPU tier".into()))?;
        let be = gpu.backend.clone();
        // Per row's sequence: its GPU blocks (id, start position, filled) in position order.
        let mut per_seq: HashMap<SeqId, GpuView> = HashMap::new();
        for &(seq, _) in rows {
            if per_seq.contains_key(&seq) {
                continue;
            }
            let blocks = self.layer_blocks(seq, layer)?;
            let mut on_gpu = Vec::new();
            for (j, b) in blocks.iter().enumerate().filter(|_| with_resident) {
                if let Loc::Gpu(id) = b.loc {
                    on_gpu.push((id, j * bt, b.filled));
                }
            }
            // Fetched blocks are full and older than the GPU tail, so position order keeps the
            // decode kernel's contract (every block full but the last).
            on_gpu.extend(
                fetched
                    .iter()
                    .filter(|s| s.0 == seq)
                    .map(|&(_, id, start, len)| (id, start, len)),
            );
            on_gpu.sort_unstable_by_key(|b| b.1);
            per_seq.insert(seq, on_gpu);
        }
        // A group of fetched blocks alone may leave a row's sequence with no block, or end
        // before its tail: the prefill kernel takes any blocks (and gives such rows lse -inf).
        let decode = with_resident && {
            let mut seen = std::collections::HashSet::new();
            rows.iter().all(|&(seq, pos)| {
                seen.insert(seq) && pos + 1 == self.len(seq, layer) && !per_seq[&seq].is_empty()
            })
        };
        if decode {
            // Every listed block is full except the tail: the decode kernel's table contract.
            let tables: Vec<Vec<u32>> = rows
                .iter()
                .map(|(s, _)| per_seq[s].iter().map(|b| b.0).collect())
                .collect();
            let lens: Vec<usize> = rows
                .iter()
                .map(|(s, _)| per_seq[s].iter().map(|b| b.2).sum())
                .collect();
            let t = be.upload_block_tables(&tables, &lens, bt).map_err(err)?;
            be.decode_attention(q, &gpu.pool, &t, ag).map_err(err)
        } else {
            self.prefill_on_gpu(&be, rows, &per_seq, q, ag)
        }
    }

    /// Causal attention of `rows` over their sequences' GPU-resident blocks (prefill chunks).
    fn prefill_on_gpu(
        &self,
        be: &strata_kernels::CudaBackend,
        rows: &[(SeqId, usize)],
        per_seq: &HashMap<SeqId, GpuView>,
        q: &CudaTensor,
        ag: &AttentionGeometry,
    ) -> Result<DevicePartial, KvError> {
        let err = |e: strata_kernels::KernelError| KvError::Gpu(e.to_string());
        let gpu = self
            .gpu
            .as_ref()
            .ok_or_else(|| KvError::Gpu("prefill without a GPU tier".into()))?;
        // Sequences in order of first appearance; rows name them by index.
        let mut order: HashMap<SeqId, u32> = HashMap::new();
        let mut seqs = Vec::new();
        let mut at = Vec::with_capacity(rows.len());
        for &(seq, pos) in rows {
            let b = *order.entry(seq).or_insert_with(|| {
                let blocks = &per_seq[&seq];
                seqs.push(GpuSeqBlocks {
                    ids: blocks.iter().map(|b| b.0).collect(),
                    starts: blocks.iter().map(|b| b.1 as u32).collect(),
                    last_len: blocks.last().map_or(0, |b| b.2),
                });
                (seqs.len() - 1) as u32
            });
            at.push((b, pos as u32));
        }
        let tables = be.upload_paged_tables(&gpu.pool, &seqs).map_err(err)?;
        let qrows = be.upload_query_rows(&at).map_err(err)?;
        be.prefill_attention(&gpu.pool, &tables, q, &qrows, ag.n_heads, ag.scale)
            .map_err(err)
    }
}

/// Stores one token's `k`, `v: [kv_heads, head_dim]` at token `t` of a block laid out as
/// `[2 (K, V), kv_heads, block_tokens, head_dim]`.
fn store_token(data: &mut KvSliceMut<'_>, g: &KvGeometry, t: usize, k: &[f32], v: &[f32]) {
    let (e, hd) = (g.block_elems(), g.head_dim);
    for h in 0..g.kv_heads {
        let dst = (h * g.block_tokens + t) * hd;
        data.store(dst, &k[h * hd..(h + 1) * hd]);
        data.store(e + dst, &v[h * hd..(h + 1) * hd]);
    }
}
