//! IO backends: the [`IoBackend`] trait, the engine choice ([`IoEngine`], [`open_backend`]) and
//! opening files for direct IO ([`open_direct`]).
//!
//! Ownership contract shared by every backend (tokio-uring's): a submission moves the [`IoBuf`]
//! into the backend; it comes back only inside the operation's [`Completion`] (or inside the
//! [`SubmitError`] of a refused submission). While an operation is in flight nobody else can
//! reach its buffer, and the pool cannot hand it out again. Dropping a backend first drains
//! (waits for) every in-flight operation, then releases the buffers.
//!
//! Completion contract: `result` is `Ok(n)` with `n` the full requested length, or a smaller `n`
//! only at end of file (backends resubmit the remainder of short transfers themselves, and retry
//! EINTR/EAGAIN), or `Err` with the OS error (EIO, ENOSPC, ...). Callers map errors to typed
//! [`StorageError`]s with the path and offset they know.
//!
//! Engine choice: `IoEngine::Auto` reads `STRATA_IO_ENGINE` (`auto`, `uring`, `sync`), then
//! probes io_uring by creating the ring; if that fails (ENOSYS on old kernels, EPERM under
//! seccomp or `kernel.io_uring_disabled`), it logs a warning with the reason and how to enable it,
//! and uses the pread/pwrite thread pool.

mod faulty;
mod sync;
mod uring;

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

pub use faulty::{FAULTS_ENV, FaultConfig, FaultyBackend};
pub use sync::SyncBackend;
pub use uring::UringBackend;

use crate::error::{StorageError, SubmitError};
use crate::pool::{IoBuf, IoBufPool};

/// Index of a file in the list a backend was opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileIdx(pub u32);

/// One finished operation: the caller's tag, the outcome, and the buffer, handed back.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    /// Bytes transferred (the full length unless end of file), or the OS error.
    pub result: io::Result<usize>,
    pub buf: IoBuf,
}

/// An asynchronous positional IO engine over a fixed set of files.
pub trait IoBackend: Send {
    /// `"io_uring"`, `"sync"` or `"faulty(<inner>)"`.
    fn name(&self) -> &'static str;

    /// Queues a transfer of the first `len` bytes of `buf` at `offset` of `file`: into `buf`
    /// for [`IoDir::Read`], from it for [`IoDir::Write`]. `tag` comes back with the completion,
    /// and so does the buffer (on refusal, inside the [`SubmitError`]).
    fn submit(
        &mut self,
        dir: IoDir,
        file: FileIdx,
        offset: u64,
        buf: IoBuf,
        len: usize,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Queues a read of `buf.len()` bytes at `offset` of `file` into `buf`.
    fn submit_read(
        &mut self,
        file: FileIdx,
        offset: u64,
        buf: IoBuf,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let len = buf.len();
        self.submit(IoDir::Read, file, offset, buf, len, tag)
    }

    /// Queues a write of the first `len` bytes of `buf` at `offset` of `file`.
    fn submit_write(
        &mut self,
        file: FileIdx,
        offset: u64,
        buf: IoBuf,
        len: usize,
        tag: u64,
    ) -> Result<(), SubmitError> {
        self.submit(IoDir::Write, file, offset, buf, len, tag)
    }

    /// Submits what is queued, waits for at least `min` completions (`0` polls) and returns all
    /// that are ready. `min` is capped at `in_flight()`.
    fn wait(&mut self, min: usize) -> Result<Vec<Completion>, StorageError>;

    /// Operations submitted and not yet returned by `wait`.
    fn in_flight(&self) -> usize;
}

/// The direction of one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDir {
    Read,
    Write,
}

/// Which IO engine to use (`--io-engine {auto,uring,sync}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// `STRATA_IO_ENGINE` if set, else io_uring when the kernel allows it, else sync.
    #[default]
    Auto,
    Uring,
    Sync,
}

/// Environment variable that forces the engine when the caller asks for `Auto`.
pub const IO_ENGINE_ENV: &str = "STRATA_IO_ENGINE";

impl FromStr for IoEngine {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(IoEngine::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(IoEngine::Uring),
            "sync" | "psync" | "pread" => Ok(IoEngine::Sync),
            other => Err(StorageError::InvalidConfig(format!(
                "IO engine {other:?}: expected auto, uring or sync"
            ))),
        }
    }
}

/// Opens the backend for `engine` over `files`, with `queue_depth` operations in flight at most
/// (io_uring ring size; sync worker threads) and `pool`'s buffers registered (io_uring).
/// Returns the backend and a line saying which engine runs and why.
pub fn open_backend(
    engine: IoEngine,
    files: Vec<File>,
    queue_depth: usize,
    pool: &IoBufPool,
) -> Result<(Box<dyn IoBackend>, String), StorageError> {
    let (engine, forced_by_env) = match engine {
        IoEngine::Auto => match std::env::var(IO_ENGINE_ENV) {
            Ok(value) => (value.parse()?, true),
            Err(_) => (IoEngine::Auto, false),
        },
        explicit => (explicit, false),
    };
    let origin = if forced_by_env {
        format!(" (set by {IO_ENGINE_ENV})")
    } else {
        String::new()
    };
    match engine {
        IoEngine::Sync => {
            let why = format!("sync: pread/pwrite thread pool requested{origin}");
            Ok((Box::new(SyncBackend::new(files, queue_depth)?), why))
        }
        IoEngine::Uring | IoEngine::Auto => match uring::create_ring(queue_depth) {
            Ok(ring) => {
                let backend = UringBackend::with_ring(ring, files, queue_depth, pool);
                let why = if engine == IoEngine::Uring {
                    "requested"
                } else {
                    "available (auto)"
                };
                Ok((Box::new(backend), format!("io_uring: {why}{origin}")))
            }
            Err(source) if engine == IoEngine::Uring => Err(StorageError::EngineUnavailable {
                engine: "io_uring",
                reason: uring_unavailable_hint(&source),
            }),
            Err(source) => {
                let hint = uring_unavailable_hint(&source);
                tracing::warn!("io_uring unavailable, using the pread/pwrite pool: {hint}");
                let why = format!("sync: io_uring unavailable: {hint}");
                Ok((Box::new(SyncBackend::new(files, queue_depth)?), why))
            }
        },
    }
}

/// Creates and drops a tiny ring: `Ok` when this process may use io_uring, else the reason and
/// how to enable it.
pub fn probe_io_uring() -> Result<(), String> {
    uring::create_ring(2)
        .map(drop)
        .map_err(|e| uring_unavailable_hint(&e))
}

fn uring_unavailable_hint(err: &io::Error) -> String {
    let how = match err.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (needs Linux 5.6+)",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "blocked by kernel.io_uring_disabled or a seccomp filter; enable it with \
             `sysctl kernel.io_uring_disabled=0` (or allow io_uring_setup in the container's \
             seccomp profile)"
        }
        Some(libc::ENOMEM) => "not enough locked memory; raise `ulimit -l`",
        _ => "set STRATA_IO_ENGINE=sync to silence this warning",
    };
    format!("io_uring_setup failed ({err}); {how}")
}

/// Opens (creating if asked) `path` read-write with O_DIRECT. If the filesystem refuses
/// O_DIRECT (EINVAL, e.g. old tmpfs), reopens it buffered with a warning. Returns the file and
/// whether it is direct.
pub fn open_direct(path: &Path, create_new: bool) -> Result<(File, bool), StorageError> {
    let open = |direct: bool| {
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create_new(create_new);
        opts.custom_flags(if direct { libc::O_DIRECT } else { 0 } | libc::O_CLOEXEC);
        opts.open(path)
    };
    let open_err = |source| StorageError::Open {
        path: path.to_path_buf(),
        source,
    };
    match open(true) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                "{}: the filesystem refuses O_DIRECT ({e}); using buffered IO (page cache), \
                 so disk bandwidth figures will be optimistic",
                path.display()
            );
            if create_new {
                // The failed O_DIRECT open may have created the file before refusing.
                let _ = std::fs::remove_file(path);
            }
            open(false).map(|f| (f, false)).map_err(open_err)
        }
        Err(e) => Err(open_err(e)),
    }
}

/// Whether an OS error is worth retrying unchanged.
pub(crate) fn is_transient(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN
}

/// Retries of transient errors per operation inside a backend before reporting them.
pub(crate) const MAX_TRANSIENT_RETRIES: u32 = 64;

fn refuse(buf: IoBuf, msg: String) -> SubmitError {
    SubmitError::new(StorageError::InvalidConfig(msg), buf)
}

/// Checks a submission's arguments shared by all backends; hands the buffer back if invalid.
pub(crate) fn check_submit(
    files: usize,
    file: FileIdx,
    buf: IoBuf,
    len: usize,
) -> Result<IoBuf, SubmitError> {
    if file.0 as usize >= files {
        return Err(refuse(
            buf,
            format!("file index {} of {files} files", file.0),
        ));
    }
    if len == 0 || len > buf.len() || len > u32::MAX as usize {
        let msg = format!(
            "transfer of {len} bytes with a buffer of {} bytes",
            buf.len()
        );
        return Err(refuse(buf, msg));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_parse() -> Result<(), StorageError> {
        assert_eq!("uring".parse::<IoEngine>()?, IoEngine::Uring);
        assert_eq!("SYNC".parse::<IoEngine>()?, IoEngine::Sync);
        assert_eq!("auto".parse::<IoEngine>()?, IoEngine::Auto);
        assert!("aio".parse::<IoEngine>().is_err());
        Ok(())
    }
}
