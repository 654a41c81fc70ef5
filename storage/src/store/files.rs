//! The block store's files: naming, clean-up of crashed runs, free-space check, device block
//! size, preallocation, and removal when the store goes away.
//!
//! Invariants:
//! - files are named `strata-<pid>-<n>.kv`, created with O_EXCL (never clobbering another
//!   store's file, even one of this process) and removed when their [`FileSet`] drops, on error
//!   paths too;
//! - at open, `strata-<pid>-*.kv` files whose pid is not a live process are left-overs of a crash
//!   and are removed (with a log line); files of live processes are never touched;
//! - the space check runs before any byte is preallocated, against `statvfs`'s `f_bavail`.
//!
//! Block size: `statx`'s `stx_dio_offset_align` (Linux 6.1+) when the filesystem reports it, else
//! the device's `queue/logical_block_size` from sysfs (what `ioctl(BLKSSZGET)` returns, readable
//! without opening the block device), else 4096.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::StorageError;
use crate::io::open_direct;

/// Fallback block size when neither statx nor sysfs tells.
pub const DEFAULT_BLOCK_BYTES: u64 = 4096;

/// One created file of the store.
pub(crate) struct StoreFile {
    pub path: PathBuf,
    pub file: Option<File>, // moved into the backend once opened
    pub direct: bool,
}

/// The store's files; removes them on drop.
pub(crate) struct FileSet {
    pub files: Vec<StoreFile>,
}

impl Drop for FileSet {
    fn drop(&mut self) {
        for f in &mut self.files {
            drop(f.file.take());
            if let Err(e) = std::fs::remove_file(&f.path) {
                tracing::warn!("cannot remove {}: {e}", f.path.display());
            }
        }
    }
}

impl FileSet {
    /// Creates the next free `strata-<pid>-<n>.kv` in `dir` (O_EXCL) and adds it to the set.
    pub fn create_next(&mut self, dir: &Path) -> Result<&StoreFile, StorageError> {
        let pid = std::process::id();
        for n in 0..u32::MAX {
            let path = dir.join(format!("strata-{pid}-{n}.kv"));
            match open_direct(&path, true) {
                Ok((file, direct)) => {
                    self.files.push(StoreFile {
                        path,
                        file: Some(file),
                        direct,
                    });
                    return Ok(&self.files[self.files.len() - 1]);
                }
                Err(StorageError::Open { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::InvalidConfig(format!(
            "no free file name in {}",
            dir.display()
        )))
    }
}

/// Parses `strata-<pid>-<n>.kv` → pid.
fn leftover_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("strata-")?.strip_suffix(".kv")?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes left-overs of crashed runs from `dir`; returns how many were removed.
pub fn remove_leftovers(dir: &Path) -> Result<usize, StorageError> {
    let entries = std::fs::read_dir(dir).map_err(|source| StorageError::Open {
        path: dir.into(),
        source,
    })?;
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(leftover_pid) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(
                    "removed {} left by a crashed run (pid {pid})",
                    path.display()
                );
                removed += 1;
            }
            Err(e) => tracing::warn!("cannot remove left-over {}: {e}", path.display()),
        }
    }
    Ok(removed)
}

/// Bytes available to unprivileged users in the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64, StorageError> {
    let open_err = |source| StorageError::Open {
        path: dir.into(),
        source,
    };
    let cpath = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| open_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `cpath` is a valid NUL-terminated string and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(cpath.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(open_err(io::Error::last_os_error()));
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// `(offset alignment, memory alignment)` for direct IO on `file`.
pub(crate) fn dio_alignment(file: &File) -> (u64, u64) {
    if let Some(align) = statx_dio(file) {
        return align;
    }
    let block = sysfs_logical_block(file).unwrap_or(DEFAULT_BLOCK_BYTES);
    (block, block)
}

fn statx_dio(file: &File) -> Option<(u64, u64)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call, the path is an empty NUL-terminated string used with
    // AT_EMPTY_PATH, and `stx` is a valid out-pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let ok = rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0;
    ok.then(|| {
        (
            u64::from(stx.stx_dio_offset_align),
            u64::from(stx.stx_dio_mem_align),
        )
    })
}

fn sysfs_logical_block(file: &File) -> Option<u64> {
    let dev = file.metadata().ok()?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let base = format!("/sys/dev/block/{major}:{minor}");
    [
        format!("{base}/queue/logical_block_size"),
        format!("{base}/../queue/logical_block_size"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
    .filter(|b| b.is_power_of_two())
}

/// Reserves `bytes` for `file`: fallocate, else posix_fallocate, else set_len.
pub(crate) fn preallocate(file: &File, path: &Path, bytes: u64) -> Result<(), StorageError> {
    let err = |source| StorageError::Preallocate {
        path: path.into(),
        bytes,
        source,
    };
    let len = libc::off_t::try_from(bytes).map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: fallocate on an open fd with a valid range; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Err(err(e));
    }
    // SAFETY: as above; posix_fallocate returns the error number instead of setting errno.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC => Err(err(io::Error::from_raw_os_error(rc))),
        _ => file.set_len(bytes).map_err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_parse() {
        assert_eq!(leftover_pid("strata-999999-0.kv"), Some(999_999));
        assert_eq!(leftover_pid("strata-12-3.kv"), Some(12));
        assert_eq!(leftover_pid("strata-12.kv"), None);
        assert_eq!(leftover_pid("strata-x-0.kv"), None);
        assert_eq!(leftover_pid("other-12-0.kv"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id()));
    }
}
