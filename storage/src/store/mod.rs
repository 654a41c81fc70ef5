//! The block store: fixed-size slots over preallocated files in one directory (`--disk-dir`),
//! with a checksum per slot, batched writes and streaming reads ([`BlockStore`]).
//!
//! Invariants:
//! - slot `s` lives in file `s / slots_per_file` at offset `(s % slots_per_file) * slot_bytes`;
//!   `slot_bytes` is the requested size rounded up to the device's direct-IO block size, so every
//!   transfer is aligned;
//! - a slot is `Free`, `Empty` (allocated, nothing valid written) or `Written { len, sum }`; a
//!   write first marks its slots `Empty` and only a fully completed write records the checksum, so
//!   a read never returns data that was not entirely written;
//! - `in_use() <= capacity_slots()` always; allocation fails with `Full` beyond it;
//! - at most `queue_depth` operations are in flight, one staging buffer each;
//! - drop order: the backend (draining in-flight IO and unregistering buffers) before the staging
//!   pool's last handle, then the files are closed and removed.

mod files;
mod stream;
pub use stream::{BUFFER_WAIT, ReadBlock};

use std::path::PathBuf;

use crate::error::{StorageError, fmt_bytes};
use crate::io::{FaultConfig, FaultyBackend, FileIdx, IoBackend, IoEngine, open_backend};
use crate::pool::IoBufPool;
use files::FileSet;

pub use files::{DEFAULT_BLOCK_BYTES, free_bytes, remove_leftovers};

/// Settings of a [`BlockStore`].
#[derive(Clone, Debug)]
pub struct BlockStoreConfig {
    /// Directory for the store's files (created if missing).
    pub dir: PathBuf,
    /// Bytes of slots to preallocate (`--disk-mem`); rounded down to whole slots.
    pub capacity_bytes: u64,
    /// Bytes per slot, rounded up to the device block size.
    pub slot_bytes: usize,
    pub engine: IoEngine,
    /// Operations in flight at most (and staging buffers allocated).
    pub queue_depth: usize,
    /// Wrap the backend in the fault injector (tests, `STRATA_FAULTS`).
    pub faults: Option<FaultConfig>,
}

/// Largest file [`BlockStore::open`] creates; more capacity is spread over several files.
pub const MAX_FILE_BYTES: u64 = 64 << 30;

impl BlockStoreConfig {
    /// Defaults: auto engine, queue depth 32, no faults.
    pub fn new(dir: impl Into<PathBuf>, capacity_bytes: u64, slot_bytes: usize) -> Self {
        BlockStoreConfig {
            dir: dir.into(),
            capacity_bytes,
            slot_bytes,
            engine: IoEngine::Auto,
            queue_depth: 32,
            faults: None,
        }
    }
}

/// One slot of the block store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskSlot(u32);

impl DiskSlot {
    pub fn index(self) -> u32 {
        self.0
    }
}

/// Bytes, operation counts and time spent in the store since it opened.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IoStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Block reads completed (retries not counted).
    pub reads: u64,
    pub writes: u64,
    /// Wall time inside `read_blocks`, excluding the caller's callbacks.
    pub read_seconds: f64,
    pub write_seconds: f64,
    /// Operations resubmitted after a short transfer, EIO, or a checksum mismatch.
    pub retries: u64,
    /// Checksum mismatches detected (each retried once before it is an error).
    pub corrupt_reads: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SlotState {
    Free,
    Empty,
    Written { len: usize, sum: u64 },
}

/// Checksummed fixed-size slots on NVMe. See the module header.
pub struct BlockStore {
    backend: Option<Box<dyn IoBackend>>, // Some until drop
    pool: IoBufPool,                     // staging: queue_depth buffers of slot_bytes
    files: FileSet,
    engine_why: String,
    slot_bytes: u64,  // multiple of block_bytes
    block_bytes: u64, // direct-IO offset alignment of the device
    slots_per_file: u64,
    state: Vec<SlotState>, // [capacity_slots]
    free: Vec<u32>,        // stack of free slots
    queue_depth: usize,
    stats: IoStats,
}

impl BlockStore {
    /// Creates and preallocates the store's files in `cfg.dir`, after removing crashed runs'
    /// left-overs and checking free space. See [`BlockStoreConfig`].
    pub fn open(cfg: BlockStoreConfig) -> Result<BlockStore, StorageError> {
        Self::open_split(cfg, MAX_FILE_BYTES)
    }

    /// [`BlockStore::open`] with files of at most `max_file_bytes` (at least one slot each).
    pub fn open_split(
        cfg: BlockStoreConfig,
        max_file_bytes: u64,
    ) -> Result<BlockStore, StorageError> {
        if cfg.slot_bytes == 0 || cfg.queue_depth == 0 {
            return Err(StorageError::InvalidConfig(format!(
                "slot size {} and queue depth {} must be non-zero",
                cfg.slot_bytes, cfg.queue_depth
            )));
        }
        std::fs::create_dir_all(&cfg.dir).map_err(|source| StorageError::Open {
            path: cfg.dir.clone(),
            source,
        })?;
        // A crashed or killed run's files are removed first: their space is free. Then the budget
        // is checked against the free space before any other check or allocation, so an
        // impossible capacity is reported as what it is, and by how much it is short.
        files::remove_leftovers(&cfg.dir)?;
        let free = files::free_bytes(&cfg.dir)?;
        if cfg.capacity_bytes > free {
            return Err(StorageError::NotEnoughSpace {
                dir: cfg.dir.clone(),
                need_bytes: cfg.capacity_bytes,
                free_bytes: free,
            });
        }
        let mut set = FileSet { files: Vec::new() };
        let (block, mem_align) = match set.create_next(&cfg.dir)?.file.as_ref() {
            Some(file) => files::dio_alignment(file),
            None => (DEFAULT_BLOCK_BYTES, DEFAULT_BLOCK_BYTES),
        };
        let slot_bytes = (cfg.slot_bytes as u64).next_multiple_of(block);
        let capacity_slots = cfg.capacity_bytes / slot_bytes;
        let capacity_slots = u32::try_from(capacity_slots)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| too_small_or_large(&cfg, slot_bytes))?;
        let slots_per_file = (max_file_bytes / slot_bytes).max(1);
        preallocate_all(
            &mut set,
            &cfg,
            u64::from(capacity_slots),
            slots_per_file,
            slot_bytes,
        )?;
        let buf_bytes = usize::try_from(slot_bytes)
            .map_err(|_| StorageError::InvalidConfig(format!("slot of {slot_bytes} bytes")))?;
        let pool = IoBufPool::with_buffers(buf_bytes, cfg.queue_depth, mem_align as usize)?;
        let handles = set.files.iter_mut().filter_map(|f| f.file.take()).collect();
        let (backend, mut why) = open_backend(cfg.engine, handles, cfg.queue_depth, &pool)?;
        let backend: Box<dyn IoBackend> = match &cfg.faults {
            Some(faults) => {
                why.push_str(&format!("; fault injection {faults:?}"));
                Box::new(FaultyBackend::new(backend, faults.clone()))
            }
            None => backend,
        };
        let direct = set.files.iter().all(|f| f.direct);
        tracing::info!(
            "block store: {capacity_slots} slots of {} in {} ({} files, {}), engine {why}",
            fmt_bytes(slot_bytes),
            cfg.dir.display(),
            set.files.len(),
            if direct { "O_DIRECT" } else { "buffered" },
        );
        Ok(BlockStore {
            backend: Some(backend),
            pool,
            files: set,
            engine_why: why,
            slot_bytes,
            block_bytes: block,
            slots_per_file,
            state: vec![SlotState::Free; capacity_slots as usize],
            free: (0..capacity_slots).rev().collect(),
            queue_depth: cfg.queue_depth,
            stats: IoStats::default(),
        })
    }

    /// Takes a free slot; `Full` when all are in use.
    pub fn alloc_slot(&mut self) -> Result<DiskSlot, StorageError> {
        let capacity_slots = self.capacity_slots();
        let index = self
            .free
            .pop()
            .ok_or(StorageError::Full { capacity_slots })?;
        self.state[index as usize] = SlotState::Empty;
        Ok(DiskSlot(index))
    }

    /// Returns a slot; its contents are forgotten. Refuses foreign slots and double frees.
    pub fn free_slot(&mut self, slot: DiskSlot) -> Result<(), StorageError> {
        match self.state.get_mut(slot.0 as usize) {
            None => Err(StorageError::InvalidSlot {
                slot: slot.0,
                reason: "out of range",
            }),
            Some(SlotState::Free) => Err(StorageError::InvalidSlot {
                slot: slot.0,
                reason: "already free",
            }),
            Some(state) => {
                *state = SlotState::Free;
                self.free.push(slot.0);
                Ok(())
            }
        }
    }

    pub fn capacity_slots(&self) -> u32 {
        self.state.len() as u32
    }

    pub fn in_use(&self) -> u32 {
        self.capacity_slots() - self.free.len() as u32
    }

    /// Bytes per slot (the requested size rounded up to the device block size).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes as usize
    }

    pub fn stats(&self) -> IoStats {
        self.stats
    }

    /// Backend name: `io_uring`, `sync`, `faulty(...)`.
    pub fn engine_name(&self) -> &'static str {
        self.backend.as_ref().map_or("closed", |b| b.name())
    }

    /// Which engine runs and why (e.g. io_uring unavailable and the sync pool used instead).
    pub fn engine_reason(&self) -> &str {
        &self.engine_why
    }

    /// Whether every file is opened with O_DIRECT (false after a filesystem refused it).
    pub fn is_direct(&self) -> bool {
        self.files.files.iter().all(|f| f.direct)
    }

    /// `(file index, byte offset)` of a slot.
    fn locate(&self, slot: DiskSlot) -> (FileIdx, u64) {
        let s = u64::from(slot.0);
        let file = (s / self.slots_per_file) as u32;
        (FileIdx(file), (s % self.slots_per_file) * self.slot_bytes)
    }
}

fn too_small_or_large(cfg: &BlockStoreConfig, slot_bytes: u64) -> StorageError {
    StorageError::InvalidConfig(format!(
        "capacity {} holds {} slots of {}: need between 1 and 2^32-1 slots",
        fmt_bytes(cfg.capacity_bytes),
        cfg.capacity_bytes / slot_bytes,
        fmt_bytes(slot_bytes)
    ))
}

/// Creates files 1.. and preallocates every file of the store.
fn preallocate_all(
    set: &mut FileSet,
    cfg: &BlockStoreConfig,
    slots: u64,
    slots_per_file: u64,
    slot_bytes: u64,
) -> Result<(), StorageError> {
    let file_count = slots.div_ceil(slots_per_file);
    for n in 0..file_count {
        if n > 0 {
            set.create_next(&cfg.dir)?;
        }
        let in_file = slots_per_file.min(slots - n * slots_per_file);
        let f = &set.files[n as usize];
        let Some(file) = f.file.as_ref() else {
            continue;
        };
        files::preallocate(file, &f.path, in_file * slot_bytes).map_err(|e| match e {
            StorageError::Preallocate { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                StorageError::NotEnoughSpace {
                    dir: cfg.dir.clone(),
                    need_bytes: slots * slot_bytes,
                    free_bytes: files::free_bytes(&cfg.dir).unwrap_or(0),
                }
            }
            other => other,
        })?;
    }
    Ok(())
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        // Drain in-flight IO and unregister buffers first; `files` then closes and removes the
        // files, and the pool's arena is freed with the last buffer handle.
        drop(self.backend.take());
    }
}
