//! strata's NVMe tier: the host arena and IO staging buffers, IO backends (io_uring, a
//! pread/pwrite thread pool, fault injection) and the checksummed block store.
//!
//! Layers, bottom up:
//! - [`arena`]: one aligned allocation ([`HostArena`]) and its carving into fixed-size slots
//!   ([`ArenaSlots`], the host KV tier);
//! - [`pool`]: IO staging buffers ([`IoBufPool`], [`IoBuf`]) carved from an arena, owned by an
//!   operation while it is in flight;
//! - [`io`]: the [`IoBackend`] trait and its engines, chosen by [`open_backend`];
//! - [`store`]: [`BlockStore`], fixed-size slots over preallocated files with a checksum per slot
//!   and streaming reads.
//!
//! Crate-wide invariants: raw pointers and io_uring `user_data` values never leave this crate;
//! every `unsafe` block states why it is sound; errors are typed ([`StorageError`]) and name the
//! path, offset or slot involved.

pub mod arena;
pub mod checksum;
pub mod error;
pub mod io;
pub mod pool;
pub mod store;

pub use arena::{ArenaSlots, HostArena, MIN_ARENA_ALIGN, SlotId, f32_view, u16_view};
pub use error::{StorageError, SubmitError, fmt_bytes};
pub use io::{
    Completion, FAULTS_ENV, FaultConfig, FaultyBackend, FileIdx, IO_ENGINE_ENV, IoBackend, IoDir,
    IoEngine, SyncBackend, UringBackend, open_backend, open_direct, probe_io_uring,
};
pub use pool::{IoBuf, IoBufPool};
pub use store::{
    BUFFER_WAIT, BlockStore, BlockStoreConfig, DiskSlot, IoStats, MAX_FILE_BYTES, ReadBlock,
    free_bytes, remove_leftovers,
};
