//! The disk tier. One worker thread owns the block store, and with it the IO ring: one owner of
//! the ring, commands in FIFO order. It does two jobs:
//! - **Spill writes** ([`DiskTier::write`]): host blocks handed down by the tier manager, written
//!   in the background while compute goes on.
//! - **Storage attention** ([`DiskTier::attend`]): for each group of queries (the rows of one
//!   sequence), it streams that sequence's disk blocks through the IO backend and attends each
//!   block as its read completes, so the attention math overlaps the reads still in flight
//!   (blocks are in the cache's KV dtype, widened to f32 as they are attended). Only
//!   the queries go in and `(o, lse)` partials come back: InstInfer's in-storage attention,
//!   emulated on the host. The worker counts the KV bytes a computational storage drive would
//!   have kept off the host link.
//!
//! - **Reads** ([`DiskTier::read`]): whole blocks back to the host, typed on the worker (K and
//!   V in the tier's dtype, hidden states in f32), for blocks the policy fetches to the compute
//!   device instead of attending near, and for stored hidden states.
//!   The caller can queue the blocks of its next read ahead ([`DiskTier::read_ahead`]), so the
//!   disk reads them while the device computes; the read then takes them from there.
//!
//! Because commands run in FIFO order, a read always sees every earlier write to its slot, so a
//! block is readable as soon as its spill is queued. Slot bookkeeping (reserve and free) happens
//! on the caller's side. The worker only moves bytes and does math. A failed write is sticky: it
//! is reported with the next attention reply, never silently dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use strata_kernels::attention::attend_partial;
use strata_kernels::{AttentionGeometry, DType, KvBlockView, KvBuf, KvSlice, Partial};
use strata_storage::{
    BlockStore, BlockStoreConfig, DiskSlot, FaultConfig, IoEngine, ReadBlock, StorageError,
    f32_view,
};

use super::stored::with_stored_kv;

use super::KvError;

#[derive(Clone, Debug)]
pub struct DiskTierConfig {
    pub dir: PathBuf,
    pub bytes: u64,
    pub engine: IoEngine,
    pub queue_depth: usize,
    /// Fault injection for tests (see `strata_storage`'s fault format), e.g. from `STRATA_FAULTS`.
    pub faults: Option<String>,
}

/// One disk block to attend: the tier's slot index and the positions it holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiskBlock {
    pub slot: u32,
    pub start_pos: usize,
    pub len: usize,
}

/// The queries of one sequence (`(row, q, pos)`) and that sequence's disk blocks.
pub(crate) struct DiskGroup {
    pub rows: Vec<(usize, Vec<f32>, usize)>,
    pub blocks: Vec<DiskBlock>,
}

/// Rows of one sequence from which storage attention splits a block's math across rows (a
/// prompt chunk) rather than across blocks (a decode step).
const PARALLEL_ROWS: usize = 8;

pub(crate) type AttendReply = Result<Vec<(usize, Partial)>, KvError>;
type ReadReply = Result<Vec<KvBuf>, KvError>;
/// `None` when the worker could not read ahead (an IO error, or a failed write it keeps for the
/// next read or attention to report): the read that wanted the blocks reads them itself.
type AheadReply = Option<Vec<KvBuf>>;

/// A block to read back whole: its slot, and whether it holds hidden states (f32) rather than
/// K and V (the tier's dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WholeBlock {
    pub slot: u32,
    pub hidden: bool,
}

enum Command {
    Write(Vec<(u32, Vec<u8>)>),
    /// Blocks read back whole (fetched to the compute device, or hidden states to recompute).
    Read {
        blocks: Vec<WholeBlock>,
        reply: Sender<ReadReply>,
    },
    Attend {
        groups: Vec<DiskGroup>,
        geometry: AttentionGeometry,
        reply: Sender<AttendReply>,
    },
    ReadAhead {
        blocks: Vec<WholeBlock>,
        reply: Sender<AheadReply>,
    },
}

/// Blocks read ahead of the [`DiskTier::read`] that will want them. `blocks[i]` is the block of
/// reply entry `i`, or `None` once its slot was freed (its bytes may belong to another block by
/// the time they are wanted).
struct ReadAhead {
    blocks: Vec<Option<WholeBlock>>,
    reply: Receiver<AheadReply>,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DiskStats {
    pub bytes_read: u64,
    pub result_bytes: u64,
    pub attend_seconds: f64,
    /// Attention math within `attend_seconds`: a decode step's, summed over the pool threads
    /// that did it beside the reads; a prompt chunk's, the worker's wall time in it.
    pub attend_math_seconds: f64,
    pub write_seconds: f64,
    /// Blocks a read found already read ahead.
    pub blocks_read_ahead: u64,
}

pub(crate) struct DiskTier {
    tx: Option<Sender<Command>>,
    worker: Option<JoinHandle<()>>,
    free: Vec<u32>,
    capacity: usize,
    engine: String,
    stats: Arc<Mutex<DiskStats>>,
    ahead: Option<ReadAhead>,
}

impl DiskTier {
    /// Opens the tier for blocks of `bytes_per_block` bytes, K and V in `dtype`.
    pub fn open(
        cfg: DiskTierConfig,
        bytes_per_block: usize,
        dtype: DType,
    ) -> Result<Self, KvError> {
        let faults = cfg.faults.as_deref().map(FaultConfig::parse).transpose()?;
        let store = BlockStore::open(BlockStoreConfig {
            dir: cfg.dir,
            capacity_bytes: cfg.bytes,
            slot_bytes: bytes_per_block,
            engine: cfg.engine,
            queue_depth: cfg.queue_depth,
            faults,
        })?;
        let capacity = store.capacity_slots() as usize;
        let engine = store.engine_name().to_string();
        let stats = Arc::new(Mutex::new(DiskStats::default()));
        let (tx, rx) = channel();
        let worker_stats = Arc::clone(&stats);
        let worker = std::thread::Builder::new()
            .name("strata-disk".into())
            .spawn(move || Worker::new(store, bytes_per_block, dtype, worker_stats).run(rx))
            .map_err(|_| KvError::WorkerGone)?;
        Ok(Self {
            tx: Some(tx),
            worker: Some(worker),
            free: (0..capacity as u32).rev().collect(),
            capacity,
            engine,
            stats,
            ahead: None,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn in_use(&self) -> usize {
        self.capacity - self.free.len()
    }

    pub fn engine_name(&self) -> &str {
        &self.engine
    }

    pub fn stats(&self) -> DiskStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Reserves a slot for a block about to be written (bookkeeping only).
    pub fn reserve(&mut self) -> Option<u32> {
        self.free.pop()
    }

    pub fn free(&mut self, slot: u32) {
        if let Some(ahead) = &mut self.ahead {
            for b in &mut ahead.blocks {
                if b.is_some_and(|b| b.slot == slot) {
                    *b = None;
                }
            }
        }
        self.free.push(slot);
    }

    fn send(&self, cmd: Command) -> Result<(), KvError> {
        self.tx
            .as_ref()
            .ok_or(KvError::WorkerGone)?
            .send(cmd)
            .map_err(|_| KvError::WorkerGone)
    }

    /// Queues blocks to be written; returns at once.
    pub fn write(&mut self, blocks: Vec<(u32, Vec<u8>)>) -> Result<(), KvError> {
        self.send(Command::Write(blocks))
    }

    /// Reads `blocks` back whole, in order (after every write queued before). Blocks read
    /// ahead ([`DiskTier::read_ahead`]) come from there; the rest are read now.
    pub fn read(&mut self, blocks: Vec<WholeBlock>) -> Result<Vec<KvBuf>, KvError> {
        let mut ready = self.take_read_ahead()?;
        let mut out: Vec<Option<KvBuf>> = blocks.iter().map(|b| ready.remove(b)).collect();
        let missing: Vec<WholeBlock> = blocks
            .iter()
            .zip(&out)
            .filter(|(_, o)| o.is_none())
            .map(|(&b, _)| b)
            .collect();
        let hits = (blocks.len() - missing.len()) as u64;
        if let Ok(mut s) = self.stats.lock() {
            s.blocks_read_ahead += hits;
        }
        if !missing.is_empty() {
            let _span = tracing::debug_span!("read_disk", blocks = missing.len()).entered();
            let (reply, rx) = channel();
            self.send(Command::Read {
                blocks: missing,
                reply,
            })?;
            let mut read = rx.recv().map_err(|_| KvError::WorkerGone)??.into_iter();
            for o in out.iter_mut().filter(|o| o.is_none()) {
                *o = read.next();
            }
        }
        out.into_iter()
            .map(|o| o.ok_or(KvError::WorkerGone))
            .collect()
    }

    /// Queues reads of `blocks` for the next [`DiskTier::read`], which takes whichever of its
    /// blocks are among them; returns at once. A read-ahead not yet taken is dropped. A slot
    /// must hold its block's bytes (its write queued) and keep them until read or freed: disk
    /// blocks are full and never rewritten in place, so only a free ends that.
    pub fn read_ahead(&mut self, blocks: Vec<WholeBlock>) -> Result<(), KvError> {
        let (reply, rx) = channel();
        self.send(Command::ReadAhead {
            blocks: blocks.clone(),
            reply,
        })?;
        self.ahead = Some(ReadAhead {
            blocks: blocks.into_iter().map(Some).collect(),
            reply: rx,
        });
        Ok(())
    }

    /// The blocks read ahead, once the worker has read them (empty when there were none or the
    /// worker could not read them).
    fn take_read_ahead(&mut self) -> Result<HashMap<WholeBlock, KvBuf>, KvError> {
        let Some(ahead) = self.ahead.take() else {
            return Ok(HashMap::new());
        };
        let _span = tracing::debug_span!("wait_read_ahead").entered();
        let read = ahead.reply.recv().map_err(|_| KvError::WorkerGone)?;
        Ok(match read {
            Some(data) => ahead
                .blocks
                .into_iter()
                .zip(data)
                .filter_map(|(b, d)| Some((b?, d)))
                .collect(),
            None => HashMap::new(),
        })
    }

    /// Queues storage attention for `groups`; the partials arrive on the returned channel.
    pub fn attend(
        &mut self,
        groups: Vec<DiskGroup>,
        geometry: AttentionGeometry,
    ) -> Result<Receiver<AttendReply>, KvError> {
        let (reply, rx) = channel();
        self.send(Command::Attend {
            groups,
            geometry,
            reply,
        })?;
        Ok(rx)
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        // Closing the channel stops the worker after the queued commands; joining it drains the
        // IO before the store (and its files) goes away.
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

struct Worker {
    store: BlockStore,
    /// The store's slots, allocated once; the tier's slot index `i` is `slots[i]`.
    slots: Vec<DiskSlot>,
    bytes_per_block: usize,
    /// K and V's dtype in the blocks.
    dtype: DType,
    stats: Arc<Mutex<DiskStats>>,
    /// The first failed write, reported with the next attention reply.
    failed: Option<StorageError>,
}

impl Worker {
    fn new(
        mut store: BlockStore,
        bytes_per_block: usize,
        dtype: DType,
        stats: Arc<Mutex<DiskStats>>,
    ) -> Self {
        let slots = (0..store.capacity_slots())
            .map_while(|_| store.alloc_slot().ok())
            .collect();
        Self {
            store,
            slots,
            bytes_per_block,
            dtype,
            stats,
            failed: None,
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        // A command that arrived during a decode stream and waits for it to end (FIFO).
        let mut next: Option<Command> = None;
        loop {
            let cmd = match next.take() {
                Some(cmd) => cmd,
                None => match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => return,
                },
            };
            match cmd {
                Command::Write(blocks) => self.write(blocks),
                Command::Read { blocks, reply } => {
                    let result = match self.failed.take() {
                        Some(e) => Err(KvError::Storage(e)),
                        None => self.read(&blocks),
                    };
                    let _ = reply.send(result);
                }
                Command::ReadAhead { blocks, reply } => {
                    // A failed write stays for the next read or attention to report.
                    let result = match self.failed {
                        Some(_) => None,
                        None => self.read(&blocks).ok(),
                    };
                    let _ = reply.send(result);
                }
                Command::Attend {
                    groups,
                    geometry,
                    reply,
                } => {
                    if let Some(e) = self.failed.take() {
                        let _ = reply.send(Err(KvError::Storage(e)));
                    } else if groups.iter().any(|gr| gr.rows.len() >= PARALLEL_ROWS) {
                        let _ = reply.send(self.attend_chunk(groups, &geometry));
                    } else {
                        let job = StreamJob::new(groups, geometry, reply);
                        next = self.attend_stream(job, &rx);
                    }
                }
            }
        }
    }

    fn write(&mut self, blocks: Vec<(u32, Vec<u8>)>) {
        if self.failed.is_some() {
            return;
        }
        let t0 = Instant::now();
        let items: Vec<(DiskSlot, &[u8])> = blocks
            .iter()
            .map(|(i, data)| (self.slots[*i as usize], data.as_slice()))
            .collect();
        if let Err(e) = self.store.write_blocks(&items) {
            self.failed = Some(e);
        }
        if let Ok(mut s) = self.stats.lock() {
            s.write_seconds += t0.elapsed().as_secs_f64();
        }
    }

    /// Reads `blocks` whole, typed here (K and V in the tier's dtype, hidden states as f32),
    /// so the caller gets them without another copy.
    fn read(&mut self, blocks: &[WholeBlock]) -> Result<Vec<KvBuf>, KvError> {
        let disk: Vec<DiskSlot> = blocks.iter().map(|b| self.slots[b.slot as usize]).collect();
        let mut out = vec![KvBuf::F32(Vec::new()); blocks.len()];
        let (bpb, dtype) = (self.bytes_per_block, self.dtype);
        self.store.read_blocks(&disk, |i, bytes| {
            let bytes = &bytes[..bpb];
            out[i] = if blocks[i].hidden {
                KvBuf::F32(f32_view(bytes).to_vec())
            } else {
                with_stored_kv(bytes, dtype, KvBuf::copy_of)
            };
            Ok::<(), StorageError>(())
        })?;
        Ok(out)
    }

    /// A prompt chunk's storage attention: its many rows per sequence, attended where each
    /// block's read completes, rows in parallel (holding every block's partials for every row
    /// until the end, as a decode stream does, would cost rows × blocks partials).
    fn attend_chunk(
        &mut self,
        groups: Vec<DiskGroup>,
        g: &AttentionGeometry,
    ) -> Result<Vec<(usize, Partial)>, KvError> {
        let t0 = Instant::now();
        // Every group's blocks go into one streaming read, so the queue stays full across
        // sequences instead of draining at the end of each one.
        let order = block_order(&groups);
        let slots: Vec<DiskSlot> = order
            .iter()
            .map(|&(gi, bi)| self.slots[groups[gi].blocks[bi].slot as usize])
            .collect();
        let mut acc = empty_partials(&groups, g);
        let (bpb, dtype, e) = (self.bytes_per_block, self.dtype, g.block_elems());
        let mut math = Duration::ZERO;
        self.store.read_blocks(&slots, |i, bytes| {
            let t = Instant::now();
            let (gi, bi) = order[i];
            let group = &groups[gi];
            with_stored_kv(&bytes[..bpb], dtype, |data| {
                let view = block_view(data, e, group.blocks[bi]);
                attend_rows(&mut acc[gi], &group.rows, &view, g);
            });
            math += t.elapsed();
            Ok::<(), StorageError>(())
        })?;
        let out = rows_with_partials(&groups, acc);
        let (seconds, math_s) = (t0.elapsed().as_secs_f64(), math.as_secs_f64());
        let bytes = (slots.len() * bpb) as u64;
        tracing::debug!(
            blocks = slots.len(),
            rows = out.len(),
            bytes,
            seconds,
            math_s,
            "storage attention"
        );
        if let Ok(mut s) = self.stats.lock() {
            s.bytes_read += bytes;
            s.result_bytes += (out.len() * g.n_heads * (g.head_dim + 1) * 4) as u64;
            s.attend_seconds += seconds;
            s.attend_math_seconds += math_s;
        }
        Ok(out)
    }

    /// Decode steps' storage attention as one stream of reads: `first`'s blocks, then those of
    /// every decode command that arrives while the stream runs (the executor ships a GPU
    /// batch's queries while the one before still streams), so the IO queue never drains
    /// between commands. Each block is attended on the thread pool as its read completes while
    /// this thread (the ring's owner) goes on reading; its buffer returns for the next read
    /// when its math is done, and the task that finishes a command's last block merges that
    /// command's partials, in block order, and replies, while the stream goes on. (Attended
    /// inline, a command's math followed its reads: a virtual disk completes a queue of reads
    /// together, and the worker then attended them one by one; on an H100 host, W7 spent 2.1 of
    /// 8.4 ms a call so, and the disk idled 0.7 ms between calls.) Returns a command of another
    /// kind that arrived meanwhile, which ends the stream and runs next.
    fn attend_stream(&mut self, first: StreamJob, rx: &Receiver<Command>) -> Option<Command> {
        let t0 = Instant::now();
        if first.order.is_empty() {
            first.finish(self.bytes_per_block, &self.stats);
            return None;
        }
        let first_slots = first.slots(&self.slots);
        let jobs = RefCell::new(vec![Arc::new(first)]);
        // Stream index -> (job, block of the job).
        let index = RefCell::new((0..first_slots.len()).map(|k| (0, k)).collect::<Vec<_>>());
        let deferred = RefCell::new(None);
        let (dtype, bpb, stats) = (self.dtype, self.bytes_per_block, &self.stats);
        let (store, worker_slots) = (&mut self.store, &self.slots);
        let result = rayon::in_place_scope(|scope| {
            store.read_stream(
                &first_slots,
                || {
                    if deferred.borrow().is_some() {
                        return Vec::new();
                    }
                    match rx.try_recv() {
                        Ok(Command::Attend {
                            groups,
                            geometry,
                            reply,
                        }) if groups.iter().all(|gr| gr.rows.len() < PARALLEL_ROWS) => {
                            let job = StreamJob::new(groups, geometry, reply);
                            if job.order.is_empty() {
                                job.finish(bpb, stats);
                                return Vec::new();
                            }
                            let slots = job.slots(worker_slots);
                            let mut jobs = jobs.borrow_mut();
                            let j = jobs.len();
                            index.borrow_mut().extend((0..slots.len()).map(|k| (j, k)));
                            jobs.push(Arc::new(job));
                            slots
                        }
                        Ok(other) => {
                            *deferred.borrow_mut() = Some(other);
                            Vec::new()
                        }
                        Err(_) => Vec::new(),
                    }
                },
                |i, block| {
                    let (j, k) = index.borrow()[i];
                    let job = Arc::clone(&jobs.borrow()[j]);
                    scope.spawn(move |_| job.attend_block(k, block, dtype, bpb, stats));
                    Ok::<(), StorageError>(())
                },
            )
        });
        let jobs = jobs.into_inner();
        if let Err(e) = result {
            // Every command of the stream not yet answered gets the error (the first of them the
            // storage error itself). The scope has waited for every task, so none still runs.
            let mut e = Some(KvError::Storage(e));
            for job in jobs.iter().filter(|j| !j.has_replied()) {
                let err = e
                    .take()
                    .unwrap_or_else(|| KvError::StorageStream(job.stream_error()));
                job.fail(err);
            }
        }
        if let Ok(mut s) = self.stats.lock() {
            s.attend_seconds += t0.elapsed().as_secs_f64();
            s.attend_math_seconds += jobs.iter().map(|j| j.math_seconds()).sum::<f64>();
        }
        deferred.into_inner()
    }
}

/// One decode command of a storage attention stream: its queries and blocks, and each block's
/// partials (one per row) as the pool tasks attend them.
struct StreamJob {
    groups: Vec<DiskGroup>,
    g: AttentionGeometry,
    /// `(group, block)` of each block of the job, in block order.
    order: Vec<(usize, usize)>,
    parts: Vec<Mutex<Vec<Partial>>>,
    /// Blocks still to attend; the task that takes it to zero replies.
    remaining: AtomicUsize,
    /// Taken by whoever replies (the last block's task, or the stream on an error).
    reply: Mutex<Option<Sender<AttendReply>>>,
    t0: Instant,
    math_ns: AtomicU64,
}

impl StreamJob {
    fn new(groups: Vec<DiskGroup>, g: AttentionGeometry, reply: Sender<AttendReply>) -> Self {
        let order = block_order(&groups);
        Self {
            parts: order.iter().map(|_| Mutex::default()).collect(),
            remaining: AtomicUsize::new(order.len()),
            order,
            groups,
            g,
            reply: Mutex::new(Some(reply)),
            t0: Instant::now(),
            math_ns: AtomicU64::new(0),
        }
    }

    fn slots(&self, worker_slots: &[DiskSlot]) -> Vec<DiskSlot> {
        self.order
            .iter()
            .map(|&(gi, bi)| worker_slots[self.groups[gi].blocks[bi].slot as usize])
            .collect()
    }

    /// Attends block `k` of the job for every row of its sequence, then gives its buffer back;
    /// the last block's task merges and replies.
    fn attend_block(
        &self,
        k: usize,
        block: ReadBlock,
        dtype: DType,
        bpb: usize,
        stats: &Mutex<DiskStats>,
    ) {
        let t = Instant::now();
        let (gi, bi) = self.order[k];
        let group = &self.groups[gi];
        let e = self.g.block_elems();
        let p: Vec<Partial> = with_stored_kv(&block.bytes()[..bpb], dtype, |data| {
            let view = block_view(data, e, group.blocks[bi]);
            group
                .rows
                .iter()
                .map(|(_, q, pos)| attend_partial(q, *pos, std::slice::from_ref(&view), &self.g))
                .collect()
        });
        drop(block);
        self.math_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        *self.parts[k].lock().unwrap_or_else(PoisonError::into_inner) = p;
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(bpb, stats);
        }
    }

    /// Merges the blocks' partials in block order (the result does not depend on the order
    /// the reads completed in) and replies.
    fn finish(&self, bpb: usize, stats: &Mutex<DiskStats>) {
        let mut acc = empty_partials(&self.groups, &self.g);
        for (&(gi, _), part) in self.order.iter().zip(&self.parts) {
            let p = std::mem::take(&mut *part.lock().unwrap_or_else(PoisonError::into_inner));
            for (a, p) in acc[gi].iter_mut().zip(p) {
                a.merge_in(p);
            }
        }
        let out = rows_with_partials(&self.groups, acc);
        let bytes = (self.order.len() * bpb) as u64;
        tracing::debug!(
            blocks = self.order.len(),
            rows = out.len(),
            bytes,
            seconds = self.t0.elapsed().as_secs_f64(),
            math_s = self.math_seconds(),
            "storage attention"
        );
        if let Ok(mut s) = stats.lock() {
            s.bytes_read += bytes;
            s.result_bytes += (out.len() * self.g.n_heads * (self.g.head_dim + 1) * 4) as u64;
        }
        if let Some(reply) = self.take_reply() {
            let _ = reply.send(Ok(out));
        }
    }

    /// Replies `err` unless the job has replied already.
    fn fail(&self, err: KvError) {
        if let Some(reply) = self.take_reply() {
            let _ = reply.send(Err(err));
        }
    }

    /// The reply channel, for whoever answers first (at most once).
    fn take_reply(&self) -> Option<Sender<AttendReply>> {
        self.reply_slot().take()
    }

    fn has_replied(&self) -> bool {
        self.reply_slot().is_none()
    }

    fn reply_slot(&self) -> std::sync::MutexGuard<'_, Option<Sender<AttendReply>>> {
        self.reply.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stream_error(&self) -> String {
        format!(
            "the read stream this storage attention ({} blocks) was part of failed",
            self.order.len()
        )
    }

    fn math_seconds(&self) -> f64 {
        self.math_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// `(group, block)` of every block of `groups`, group by group, each in block order.
fn block_order(groups: &[DiskGroup]) -> Vec<(usize, usize)> {
    groups
        .iter()
        .enumerate()
        .flat_map(|(gi, gr)| (0..gr.blocks.len()).map(move |bi| (gi, bi)))
        .collect()
}

/// One empty partial per row of every group.
fn empty_partials(groups: &[DiskGroup], g: &AttentionGeometry) -> Vec<Vec<Partial>> {
    groups
        .iter()
        .map(|gr| {
            gr.rows
                .iter()
                .map(|_| Partial::empty(g.n_heads, g.head_dim))
                .collect()
        })
        .collect()
}

/// Each row's index with its partial.
fn rows_with_partials(groups: &[DiskGroup], acc: Vec<Vec<Partial>>) -> Vec<(usize, Partial)> {
    groups
        .iter()
        .zip(acc)
        .flat_map(|(gr, a)| {
            gr.rows
                .iter()
                .map(|(row, _, _)| *row)
                .zip(a)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// K and V of a stored block (`data`: K then V, `e` values each) at its positions.
fn block_view<'a>(data: KvSlice<'a>, e: usize, b: DiskBlock) -> KvBlockView<'a> {
    KvBlockView {
        k: data.slice(0..e),
        v: data.slice(e..2 * e),
        start_pos: b.start_pos,
        len: b.len,
    }
}

/// Attends one block for every row of its sequence (`(row, q, pos)`), folding each result into
/// the row's partial: rows in parallel when there are many (a prefill), inline for a decode
/// step's single row.
fn attend_rows(
    acc: &mut [Partial],
    rows: &[(usize, Vec<f32>, usize)],
    view: &KvBlockView<'_>,
    g: &AttentionGeometry,
) {
    let step = |(acc, (_, q, pos)): (&mut Partial, &(usize, Vec<f32>, usize))| {
        let p = attend_partial(q, *pos, std::slice::from_ref(view), g);
        acc.merge_in(p);
    };
    if rows.len() >= PARALLEL_ROWS {
        acc.par_iter_mut().zip(rows.par_iter()).for_each(step);
    } else {
        acc.iter_mut().zip(rows.iter()).for_each(step);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A run killed from outside (a bench's `--run-timeout`) leaves its files; the next tier
    /// opened in the directory removes them before it checks the free space, so their bytes
    /// count as free (before, the check ran first and refused a budget the disk could hold).
    #[test]
    fn a_dead_runs_files_are_removed_when_a_tier_opens() {
        let dir = std::env::temp_dir().join(format!("strata-leftover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // No process has this pid (above Linux's largest pid_max, 2^22).
        let leftover = dir.join("strata-4194305-0.kv");
        std::fs::write(&leftover, vec![0u8; 1 << 20]).unwrap();
        let cfg = DiskTierConfig {
            dir: dir.clone(),
            bytes: 4 << 20,
            engine: strata_storage::IoEngine::Sync,
            queue_depth: 4,
            faults: None,
        };
        let tier = DiskTier::open(cfg, 64 << 10, DType::BF16).unwrap();
        assert!(!leftover.exists(), "the dead run's file is still there");
        drop(tier);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
