//! Typed errors of the storage crate.
//!
//! Owns [`StorageError`] (every failure a caller can see, carrying the path, offset, slot or
//! setting a user needs to act on it), [`SubmitError`] (a refused submission, which hands the
//! buffer back) and the byte formatting used in messages. Invariant: errors never carry raw
//! pointers or io_uring `user_data` values; IO errors keep their `std::io::Error` as the source.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::pool::IoBuf;

/// Everything that can go wrong in the storage crate.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot allocate a host arena of {} aligned to {align} bytes", fmt_bytes(*bytes))]
    Alloc { bytes: u64, align: usize },

    #[error("invalid storage setting: {0}")]
    InvalidConfig(String),

    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },

    #[error("{}", not_enough_space(dir, *need_bytes, *free_bytes))]
    NotEnoughSpace {
        dir: PathBuf,
        need_bytes: u64,
        free_bytes: u64,
    },

    #[error("cannot preallocate {} for {}: {source}", fmt_bytes(*bytes), path.display())]
    Preallocate {
        path: PathBuf,
        bytes: u64,
        source: io::Error,
    },

    #[error("IO engine {engine} is unavailable: {reason}")]
    EngineUnavailable {
        engine: &'static str,
        reason: String,
    },

    #[error("io_uring {op} failed: {source}")]
    Ring { op: &'static str, source: io::Error },

    #[error("IO error at {} offset {offset} ({len} bytes): {source}", path.display())]
    Io {
        path: PathBuf,
        offset: u64,
        len: usize,
        source: io::Error,
    },

    #[error("no space left on the device writing {} at offset {offset}", path.display())]
    NoSpace { path: PathBuf, offset: u64 },

    #[error("short {op} of {} at offset {offset}: {got} of {expected} bytes", path.display())]
    ShortIo {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        expected: usize,
        got: usize,
    },

    #[error("checksum mismatch in disk slot {slot} ({} offset {offset})", path.display())]
    Corrupt {
        slot: u32,
        path: PathBuf,
        offset: u64,
    },

    #[error("the block store is full ({capacity_slots} slots in use)")]
    Full { capacity_slots: u32 },

    #[error("invalid slot {slot}: {reason}")]
    InvalidSlot { slot: u32, reason: &'static str },

    #[error("block of {len} bytes does not fit a slot of {slot_bytes} bytes")]
    BlockTooLarge { len: usize, slot_bytes: u64 },

    #[error("invalid fault specification {spec:?}: {reason}")]
    FaultSpec { spec: String, reason: String },

    #[error("the IO worker threads are gone (a worker panicked or was never started)")]
    WorkersGone,
}

/// A submission the backend refused; the buffer comes back with the reason.
#[derive(Debug)]
pub struct SubmitError {
    pub error: StorageError,
    pub buf: IoBuf,
}

impl SubmitError {
    pub fn new(error: StorageError, buf: IoBuf) -> Self {
        SubmitError { error, buf }
    }
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "submission refused: {}", self.error)
    }
}

impl std::error::Error for SubmitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// `1.5 GiB`, `256.0 KiB`, `512 B`: binary units with one decimal, as in error messages.
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Promote when one decimal would print 1024.0.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn not_enough_space(dir: &std::path::Path, need: u64, free: u64) -> String {
    format!(
        "need {} in {}, only {} free: {} missing; lower --disk-mem or free space",
        fmt_bytes(need),
        dir.display(),
        fmt_bytes(free),
        fmt_bytes(need.saturating_sub(free))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_formatted_in_binary_units() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(256 << 10), "256.0 KiB");
        assert_eq!(fmt_bytes(64 << 30), "64.0 GiB");
        assert_eq!(fmt_bytes((1 << 40) - (1 << 20)), "1.0 TiB");
    }

    #[test]
    fn missing_space_message_names_dir_and_shortfall() {
        let e = StorageError::NotEnoughSpace {
            dir: "/nvme/strata".into(),
            need_bytes: 64 << 30,
            free_bytes: 12 << 30,
        };
        assert_eq!(
            e.to_string(),
            "need 64.0 GiB in /nvme/strata, only 12.0 GiB free: 52.0 GiB missing; \
             lower --disk-mem or free space"
        );
    }
}
