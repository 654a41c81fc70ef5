//! The GPU tier: KV blocks in one device pool (`--gpu-mem`), the slot allocator, and the
//! background spill of cold blocks to the host tier. The block table itself stays in
//! [`super::KvCache`]; this module owns the device-side mechanism.
//!
//! Spills: the export kernel gathers the chosen blocks on the compute stream (in the pool's dtype
//! when the host tier holds it, the normal case: no widening, half the bytes of f32 across
//! PCIe), then the spill stream (not the weight prefetch's: a spill must not wait for the next
//! layer's weights) moves them straight into their host-arena slots, page-locked on first use
//! with their pages faulted in ahead by a thread of their own ([`super::pin`]). One spill is in flight at a time; its
//! [`CopyTicket`] is waited before anything reads the slots it writes (attention over them, a
//! host → disk spill) or the next spill.

use std::collections::{HashMap, HashSet, VecDeque};

use strata_kernels::cuda::{CopyTicket, GatheredRows, KvBlockShape, KvPool, StreamMark};
use strata_kernels::{CudaBackend, DType};
use strata_storage::{ArenaSlots, SlotId};

use super::pin::{ArenaPinner, PIN_AHEAD_BYTES};
use super::{KvError, KvGeometry, SeqId};

/// The GPU tier's budget and dtype.
#[derive(Clone, Debug)]
pub struct GpuTierConfig {
    pub backend: CudaBackend,
    /// Device memory for KV blocks (rounded down to whole blocks).
    pub bytes: u64,
    /// The pool's storage dtype; K and V are rounded to it when appended. Blocks spilled to the
    /// host tier keep exactly these values: copied as they are when the host tier holds this
    /// dtype, widened exactly when it holds f32.
    pub dtype: DType,
    /// Blocks of `bytes` set aside as scratch that host and disk blocks are copied into to be
    /// attended on the GPU (a prompt's spilled earlier chunks, KV the policy fetches), a group
    /// at a time. With `bytes` all scratch the tier holds no KV of its own: appends go to the
    /// host, and only attention runs here.
    pub scratch_blocks: usize,
}

/// Page-locking granularity of the host arena, about: rounded to whole slots ([`register_chunk`]).
const REGISTER_CHUNK: usize = 64 << 20;

/// The bytes page-locked at a time for an arena of slots `stride` bytes apart: a whole number of
/// slots, so no slot straddles two registrations (a copy into host memory that spans two
/// separately registered ranges fails with CUDA_ERROR_INVALID_VALUE, as OPT-30B's 896 KiB
/// blocks did against 64 MiB chunks).
fn register_chunk(stride: usize) -> usize {
    (REGISTER_CHUNK / stride.max(1)).max(1) * stride.max(1)
}

pub(super) struct GpuTier {
    pub backend: CudaBackend,
    /// Blocks `0..kv_blocks` hold KV (the allocator's), `kv_blocks..` are scratch.
    pub pool: KvPool,
    kv_blocks: usize,
    free: Vec<u32>,
    /// The spill whose copies may still be landing in host slots.
    pending: Option<CopyTicket>,
    /// The host slots that spill writes into.
    pending_slots: HashSet<SlotId>,
    /// Copies from host slots into scratch that may still be reading them.
    reads: Option<StreamMark>,
    /// The host arena's page-locking, its pages faulted in ahead of use; made on first use.
    pinner: Option<ArenaPinner>,
    /// Hidden states read one gather ahead on the side stream, oldest first (at most two: the
    /// gather in hand and the next one).
    pub prefetched: VecDeque<HiddenPrefetch>,
}

/// Hidden-state rows read ahead for a gather of `layer`: the blocks `(sequence, first position,
/// host slot)` in the order the gather takes them, their rows in that order.
pub(super) struct HiddenPrefetch {
    pub layer: usize,
    pub blocks: Vec<(SeqId, usize, SlotId)>,
    pub rows: GatheredRows,
}

impl GpuTier {
    pub fn new(cfg: GpuTierConfig, g: &KvGeometry) -> Result<Self, KvError> {
        let shape = KvBlockShape {
            kv_heads: g.kv_heads,
            block_tokens: g.block_tokens,
            head_dim: g.head_dim,
        };
        let block_bytes = shape.block_elems() * cfg.dtype.size_bytes();
        let n = usize::try_from(cfg.bytes / block_bytes as u64).unwrap_or(usize::MAX);
        let n = n.min(u32::MAX as usize);
        if n == 0 || n < cfg.scratch_blocks {
            return Err(KvError::GpuTooSmall {
                capacity: n,
                needed: cfg.scratch_blocks.max(1),
                bytes_per_block: block_bytes,
            });
        }
        let pool = cfg
            .backend
            .kv_pool(cfg.dtype, shape, n)
            .map_err(|e| KvError::Gpu(e.to_string()))?;
        let kv_blocks = n - cfg.scratch_blocks;
        Ok(Self {
            backend: cfg.backend,
            pool,
            kv_blocks,
            free: (0..kv_blocks as u32).rev().collect(),
            pending: None,
            pending_slots: HashSet::new(),
            reads: None,
            pinner: None,
            prefetched: VecDeque::new(),
        })
    }

    /// Blocks that hold KV (scratch excluded).
    pub fn capacity(&self) -> usize {
        self.kv_blocks
    }

    /// The scratch blocks' pool ids.
    pub fn scratch(&self) -> std::ops::Range<u32> {
        self.kv_blocks as u32..self.pool.n_blocks() as u32
    }

    pub fn in_use(&self) -> usize {
        self.capacity() - self.free.len()
    }

    pub fn bytes_per_block(&self) -> usize {
        self.pool.shape().block_elems() * self.pool.dtype().size_bytes()
    }

    pub fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Returns a block to the free list. Work enqueued later on the compute stream (an append
    /// into the reused block) is ordered after everything enqueued before, including an export
    /// of its old contents.
    pub fn free(&mut self, id: u32) {
        self.free.push(id);
    }

    /// Waits for the spill in flight, if any.
    pub fn settle(&mut self) -> Result<(), KvError> {
        self.pending_slots.clear();
        match self.pending.take() {
            Some(t) => t.wait().map_err(|e| KvError::Gpu(e.to_string())),
            None => Ok(()),
        }
    }

    /// Whether the spill in flight (if any) writes host slot `slot`.
    pub fn spill_writes(&self, slot: SlotId) -> bool {
        self.pending_slots.contains(&slot)
    }

    /// Starts copying GPU blocks `moves[i].0` into host slots `moves[i].1` (already allocated),
    /// as K and V in `dtype` (the host tier's).
    pub fn export(
        &mut self,
        host: &mut ArenaSlots,
        moves: &[(u32, SlotId)],
        dtype: DType,
    ) -> Result<(), KvError> {
        tracing::debug_span!("settle").in_scope(|| self.settle())?;
        let slot_bytes = host.slot_bytes();
        let mut dst = Vec::with_capacity(moves.len());
        let register = tracing::debug_span!("register").entered();
        for &(_, slot) in moves {
            self.register_slot(host, slot, slot_bytes)?;
            dst.push(host.slot_ptr(slot));
        }
        drop(register);
        let _span = tracing::debug_span!("copy").entered();
        let ids: Vec<u32> = moves.iter().map(|m| m.0).collect();
        // SAFETY: each destination is a distinct allocated host slot of `slot_bytes` bytes (one
        // block in `dtype`), page-locked above. Nothing reads or frees host slots before
        // `settle` waits for this ticket: the cache calls `settle` before host attention, before
        // a host → disk spill, before the next export, and when it drops.
        let t = unsafe { self.backend.kv_export_async(&self.pool, &ids, &dst, dtype) }
            .map_err(|e| KvError::Gpu(e.to_string()))?;
        self.pending = Some(t);
        self.pending_slots = moves.iter().map(|m| m.1).collect();
        Ok(())
    }

    /// Waits until no copy into scratch still reads a host slot (before one is written, reused
    /// or freed).
    pub fn settle_reads(&mut self) -> Result<(), KvError> {
        for p in &self.prefetched {
            p.rows
                .wait_read()
                .map_err(|e| KvError::Gpu(e.to_string()))?;
        }
        match self.reads.take() {
            Some(m) => m.wait().map_err(|e| KvError::Gpu(e.to_string())),
            None => Ok(()),
        }
    }

    /// Starts copying host slots `slots[i]` (K and V in the pool's dtype) into pool blocks
    /// `first + i` on the compute stream, straight from the arena (page-locked here if not yet),
    /// a run of adjacent slots in one copy. The slots must not change until
    /// [`GpuTier::settle_reads`].
    pub fn fetch_slots(
        &mut self,
        host: &mut ArenaSlots,
        first: u32,
        slots: &[SlotId],
    ) -> Result<(), KvError> {
        if slots.is_empty() {
            return Ok(());
        }
        let (base, len) = host.raw_region();
        let (stride, slot_bytes) = (host.slot_stride(), host.slot_bytes());
        let chunk = register_chunk(stride);
        let block_bytes = self.bytes_per_block();
        if slot_bytes < block_bytes {
            return Err(KvError::Gpu(format!(
                "host slots of {slot_bytes} bytes hold no {block_bytes}-byte GPU block"
            )));
        }
        let offsets: Vec<usize> = slots
            .iter()
            .map(|&s| host.slot_ptr(s) as usize - base as usize)
            .collect();
        let mut i = 0;
        while i < offsets.len() {
            // A run: adjacent slots laid out exactly as pool blocks, in one registration.
            let mut j = i + 1;
            while j < offsets.len()
                && stride == block_bytes
                && offsets[j] == offsets[j - 1] + stride
                && offsets[j] / chunk == offsets[i] / chunk
            {
                j += 1;
            }
            self.register(
                base,
                len,
                chunk,
                offsets[i],
                (j - i - 1) * stride + block_bytes,
            )?;
            // SAFETY: slots i..j are allocated arena slots, adjacent when more than one, each
            // holding a block in the pool's dtype, within one page-locked chunk (registered
            // above; the arena outlives this tier). The cache calls `settle_reads` (which waits
            // for the mark recorded below) before it writes, reuses or frees a host slot.
            unsafe {
                self.backend.kv_pool_write_pinned_async(
                    &mut self.pool,
                    first as usize + i,
                    j - i,
                    base.wrapping_add(offsets[i]),
                )
            }
            .map_err(|e| KvError::Gpu(e.to_string()))?;
            i = j;
        }
        self.mark_reads()
    }

    /// The device addresses of hidden-state rows in host slots, `rows` rows of `row_bytes` at
    /// the start of each `(slot, rows)`, for a kernel that reads them in place over PCIe
    /// ([`CudaBackend::gather_rows_f32`]); the arena chunks holding them are page-locked and
    /// mapped first. After enqueueing that read, the caller calls [`GpuTier::mark_reads`].
    pub fn mapped_rows(
        &mut self,
        host: &mut ArenaSlots,
        slots: &[(SlotId, usize)],
        row_bytes: usize,
    ) -> Result<Vec<u64>, KvError> {
        let base = host.raw_region().0;
        let chunk = register_chunk(host.slot_stride());
        // The device's address of each chunk's first byte, asked once per chunk.
        let mut chunk_dev: HashMap<usize, u64> = HashMap::new();
        let mut out = Vec::with_capacity(slots.iter().map(|s| s.1).sum());
        for &(slot, rows) in slots {
            if rows == 0 {
                continue;
            }
            let offset = self.register_slot(host, slot, rows * row_bytes)?;
            let c = offset / chunk;
            let dev = match chunk_dev.get(&c) {
                Some(&d) => d,
                None => {
                    let d = self
                        .backend
                        .mapped_device_ptr(base.wrapping_add(c * chunk))
                        .ok_or_else(|| {
                            KvError::Gpu(format!("host slot {slot:?} is not mapped for the GPU"))
                        })?;
                    chunk_dev.insert(c, d);
                    d
                }
            };
            let at = dev + (offset - c * chunk) as u64;
            out.extend((0..rows).map(|t| at + (t * row_bytes) as u64));
        }
        Ok(out)
    }

    /// The first `bytes` of each host slot in `slots`, as runs for
    /// [`CudaBackend::copy_host_pieces_beside`]: `(address, pitch, pieces)`, slots in order,
    /// a run of slots equally far apart within one page-locked chunk (registered here) per run.
    pub fn slot_runs(
        &mut self,
        host: &mut ArenaSlots,
        slots: &[SlotId],
        bytes: usize,
    ) -> Result<Vec<(*const u8, usize, usize)>, KvError> {
        let mut offsets = Vec::with_capacity(slots.len());
        for &slot in slots {
            offsets.push(self.register_slot(host, slot, bytes)?);
        }
        let (base, chunk) = (host.raw_region().0, register_chunk(host.slot_stride()));
        Ok(runs_of(&offsets, bytes, chunk)
            .into_iter()
            .map(|(first, pitch, n)| (base.wrapping_add(first).cast_const(), pitch, n))
            .collect())
    }

    /// Page-locks the arena chunks holding the first `bytes` of each of `slots` (those not yet),
    /// ahead of the GPU's reads of them in place.
    pub fn page_lock_slots(
        &mut self,
        host: &mut ArenaSlots,
        slots: &[SlotId],
        bytes: usize,
    ) -> Result<(), KvError> {
        for &slot in slots {
            self.register_slot(host, slot, bytes)?;
        }
        Ok(())
    }

    /// Records that the kernels enqueued so far read host slots in place: nothing writes,
    /// reuses or frees a host slot before they have run ([`GpuTier::settle_reads`]).
    pub fn mark_reads(&mut self) -> Result<(), KvError> {
        let mark = self
            .backend
            .compute_mark()
            .map_err(|e| KvError::Gpu(e.to_string()))?;
        self.reads = Some(mark);
        Ok(())
    }

    /// Page-locks the arena chunk holding the first `bytes` of `slot` (if not yet); returns the
    /// slot's offset in the arena.
    fn register_slot(
        &mut self,
        host: &mut ArenaSlots,
        slot: SlotId,
        bytes: usize,
    ) -> Result<usize, KvError> {
        let (base, len) = host.raw_region();
        let offset = host.slot_ptr(slot) as usize - base as usize;
        self.register(base, len, register_chunk(host.slot_stride()), offset, bytes)?;
        Ok(offset)
    }

    /// Page-locks the arena chunks (of `chunk` bytes, whole slots) covering
    /// `[offset, offset + len)`, and has the pre-faulting thread go on past them.
    fn register(
        &mut self,
        base: *mut u8,
        arena_len: usize,
        chunk: usize,
        offset: usize,
        len: usize,
    ) -> Result<(), KvError> {
        let backend = &self.backend;
        // SAFETY: the host arena `[base, base + arena_len)` is owned by the cache, which drops
        // it after this tier (field order of `KvCache`), and so after the pinner.
        let pinner = self.pinner.get_or_insert_with(|| unsafe {
            ArenaPinner::new(backend.clone(), base, arena_len, chunk, PIN_AHEAD_BYTES)
        });
        pinner.ensure(offset, len)
    }
}

impl Drop for GpuTier {
    fn drop(&mut self) {
        // Never leave a copy writing into (or reading) host memory about to be unmapped.
        let _ = self.settle();
        let _ = self.settle_reads();
    }
}

/// Pieces of `bytes` at `offsets` (in order) as runs `(first offset, pitch, pieces)`: a run
/// grows while the next piece lies the same distance further on and in the same `chunk`-byte
/// registration as its first (a chunk is whole slots, so a slot never straddles two). A run of
/// one has pitch `bytes`.
fn runs_of(offsets: &[usize], bytes: usize, chunk: usize) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for &offset in offsets {
        if let Some((first, pitch, n)) = runs.last_mut() {
            let prev = *first + (*n - 1) * *pitch;
            let grows = offset > prev
                && offset / chunk == *first / chunk
                && (*n == 1 || offset - prev == *pitch);
            if grows {
                *pitch = offset - prev;
                *n += 1;
                continue;
            }
        }
        runs.push((offset, bytes, 1));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::{register_chunk, runs_of};

    /// Slots equally far apart make one run (one 2D copy); a change of distance, a step back or
    /// a new registration chunk starts another, and every piece is in exactly one run, in order.
    #[test]
    fn hidden_rows_group_into_runs_of_equal_pitch_within_a_chunk() {
        let (slot, bytes, chunk) = (1000, 400, 10_000);
        let at = |s: &[usize]| s.iter().map(|&i| i * slot).collect::<Vec<_>>();
        // Adjacent, then 3 apart, then back to the start, then across the chunk at 10.
        let offsets = at(&[0, 1, 2, 5, 8, 11, 1, 7, 8, 9, 10, 11]);
        assert_eq!(
            runs_of(&offsets, bytes, chunk),
            vec![
                (0, slot, 3),
                (5 * slot, 3 * slot, 2),
                (11 * slot, bytes, 1),
                (slot, 6 * slot, 2),
                (8 * slot, slot, 2),
                (10 * slot, slot, 2),
            ]
        );
        assert_eq!(runs_of(&[], bytes, chunk), vec![]);
        assert_eq!(runs_of(&at(&[4]), bytes, chunk), vec![(4 * slot, bytes, 1)]);
    }

    /// Every slot lies inside one registration, whatever the block size: Llama-3-8B's 128 KiB
    /// bf16 (256 KiB f32) blocks of 32 tokens, OPT-30B's 896 KiB blocks of 16, and a slot larger than a chunk.
    #[test]
    fn registration_chunks_hold_whole_slots() {
        for stride in [
            128 << 10,
            256 << 10,
            458_752,
            917_504,
            4096,
            3 * 4096,
            96 << 20,
        ] {
            let chunk = register_chunk(stride);
            assert_eq!(chunk % stride, 0, "stride {stride}");
            assert!(
                chunk >= stride && chunk <= (64 << 20).max(stride),
                "stride {stride}"
            );
            for slot in 0..1000usize {
                let (first, last) = (slot * stride, slot * stride + stride - 1);
                assert_eq!(
                    first / chunk,
                    last / chunk,
                    "stride {stride}: slot {slot} straddles"
                );
            }
        }
    }
}
