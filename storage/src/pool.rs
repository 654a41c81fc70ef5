//! The IO staging buffer pool: a [`HostArena`] carved into `count` buffers of `buf_bytes`, handed
//! out as owned [`IoBuf`] handles that return to the pool when dropped.
//!
//! Invariants:
//! - buffer `i` is `[i * stride, i * stride + buf_bytes)` of the arena, `stride` being `buf_bytes`
//!   rounded up to the arena alignment, so every buffer is O_DIRECT-aligned;
//! - at most one `IoBuf` exists per index: an index is either on the free list or owned by
//!   exactly one handle (held by the caller, or by a backend while its operation is in flight);
//! - the arena lives as long as the pool or any `IoBuf` (each handle holds the shared state), so
//!   memory registered with the kernel is never freed under an in-flight operation;
//! - the buffer index doubles as the io_uring fixed-buffer index of the pool's registration.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::arena::HostArena;
use crate::error::StorageError;

struct PoolShared {
    arena: HostArena,
    buf_bytes: usize,
    stride: usize,
    count: usize,
    free: Mutex<Vec<u32>>, // stack of free buffer indices
    /// Signalled when a buffer returns, for [`IoBufPool::take_wait`].
    returned: Condvar,
}

impl PoolShared {
    fn free_list(&self) -> MutexGuard<'_, Vec<u32>> {
        // A panic while holding this lock cannot leave the Vec inconsistent (push/pop only).
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn buf_ptr(&self, index: u32) -> *mut u8 {
        // SAFETY: `index < count` for every index the pool hands out, and
        // `count * stride <= arena.len()` by construction, so the offset is in bounds.
        unsafe { self.arena.base_ptr().add(index as usize * self.stride) }
    }
}

/// A pool of aligned IO staging buffers carved from one arena. Cheap to clone (shared state).
#[derive(Clone)]
pub struct IoBufPool {
    shared: Arc<PoolShared>,
}

impl fmt::Debug for IoBufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBufPool")
            .field("buf_bytes", &self.shared.buf_bytes)
            .field("count", &self.shared.count)
            .field("available", &self.available())
            .finish()
    }
}

impl IoBufPool {
    /// Carves `count` buffers of `buf_bytes` from `arena` (which must be large enough).
    pub fn new(
        arena: HostArena,
        buf_bytes: usize,
        count: usize,
    ) -> Result<IoBufPool, StorageError> {
        let stride = buf_bytes.next_multiple_of(arena.align());
        if buf_bytes == 0 || count == 0 || count > u32::MAX as usize {
            return Err(StorageError::InvalidConfig(format!(
                "IO buffer pool of {count} buffers of {buf_bytes} bytes"
            )));
        }
        if stride
            .checked_mul(count)
            .is_none_or(|need| need > arena.len())
        {
            return Err(StorageError::InvalidConfig(format!(
                "{count} IO buffers of {buf_bytes} bytes do not fit an arena of {} bytes",
                arena.len()
            )));
        }
        let free = (0..count as u32).rev().collect();
        let shared = PoolShared {
            arena,
            buf_bytes,
            stride,
            count,
            free: Mutex::new(free),
            returned: Condvar::new(),
        };
        Ok(IoBufPool {
            shared: Arc::new(shared),
        })
    }

    /// Allocates a fresh arena sized for `count` buffers of `buf_bytes` aligned to `align`.
    pub fn with_buffers(
        buf_bytes: usize,
        count: usize,
        align: usize,
    ) -> Result<Self, StorageError> {
        let align = align.max(crate::arena::MIN_ARENA_ALIGN);
        let total = buf_bytes
            .next_multiple_of(align)
            .checked_mul(count)
            .ok_or_else(|| {
                StorageError::InvalidConfig(format!(
                    "{count} buffers of {buf_bytes} bytes overflow"
                ))
            })?;
        IoBufPool::new(HostArena::new(total, align)?, buf_bytes, count)
    }

    /// Takes a free buffer, or `None` while all of them are held or in flight.
    pub fn take(&self) -> Option<IoBuf> {
        let index = self.shared.free_list().pop()?;
        Some(IoBuf {
            shared: Arc::clone(&self.shared),
            index,
        })
    }

    /// Takes a free buffer, waiting up to `timeout` for one to return when all are held; `None`
    /// if none came back in time. For readers whose caller keeps read buffers for a while (to
    /// compute on them elsewhere) and drops them when done.
    pub fn take_wait(&self, timeout: Duration) -> Option<IoBuf> {
        let free = self.shared.free_list();
        let (mut free, _) = self
            .shared
            .returned
            .wait_timeout_while(free, timeout, |f| f.is_empty())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = free.pop()?;
        Some(IoBuf {
            shared: Arc::clone(&self.shared),
            index,
        })
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.shared.free_list().len()
    }

    /// Total number of buffers.
    pub fn count(&self) -> usize {
        self.shared.count
    }

    /// Size of each buffer in bytes.
    pub fn buf_bytes(&self) -> usize {
        self.shared.buf_bytes
    }

    /// Whether `buf` was carved from this pool (and so may use its fixed-buffer registration).
    pub(crate) fn owns(&self, buf: &IoBuf) -> bool {
        Arc::ptr_eq(&self.shared, &buf.shared)
    }

    /// `(address, length)` of every buffer in index order, for io_uring registration.
    pub(crate) fn regions(&self) -> Vec<(*mut u8, usize)> {
        (0..self.shared.count as u32)
            .map(|i| (self.shared.buf_ptr(i), self.shared.buf_bytes))
            .collect()
    }
}

/// Owned handle to one aligned buffer of an [`IoBufPool`]; returns to the pool when dropped.
pub struct IoBuf {
    shared: Arc<PoolShared>,
    index: u32,
}

// SAFETY: an IoBuf is the unique owner of its region (pool invariant), so moving it to another
// thread moves exclusive access with it; the shared state is `Sync` (Mutex + immutable fields).
unsafe impl Send for IoBuf {}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IoBuf {{ index: {}, len: {} }}",
            self.index, self.shared.buf_bytes
        )
    }
}

impl IoBuf {
    /// Index within its pool, which is also its io_uring fixed-buffer index.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Length in bytes (the pool's `buf_bytes`).
    pub fn len(&self) -> usize {
        self.shared.buf_bytes
    }

    /// Always false: buffers have a non-zero size.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region is in bounds and initialized (arena zeroed at allocation); this
        // handle is its only owner and `&self` forbids a concurrent `&mut`.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only live view.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len()) }
    }

    /// Start address, for the kernel; crate-private.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.shared.buf_ptr(self.index)
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        self.shared.free_list().push(self.index);
        self.shared.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_unique_and_return_on_drop() -> Result<(), StorageError> {
        let pool = IoBufPool::with_buffers(5000, 3, 4096)?;
        let a = pool.take();
        let b = pool.take();
        let c = pool.take();
        assert!(pool.take().is_none());
        let bufs: Vec<IoBuf> = [a, b, c].into_iter().flatten().collect();
        assert_eq!(bufs.len(), 3);
        for buf in &bufs {
            assert_eq!(buf.as_ptr() as usize % 4096, 0);
            assert_eq!(buf.len(), 5000);
        }
        let mut indices: Vec<usize> = bufs.iter().map(IoBuf::index).collect();
        indices.sort_unstable();
        assert_eq!(indices, vec![0, 1, 2]);
        drop(bufs);
        assert_eq!(pool.available(), 3);
        Ok(())
    }

    #[test]
    fn buffer_outlives_pool_handle_and_is_send() -> Result<(), StorageError> {
        let pool = IoBufPool::with_buffers(4096, 1, 4096)?;
        let mut buf = pool
            .take()
            .ok_or(StorageError::InvalidConfig("empty".into()))?;
        drop(pool);
        let handle = std::thread::spawn(move || {
            buf.as_mut_slice().fill(7);
            buf.as_slice().iter().all(|&b| b == 7)
        });
        assert!(handle.join().unwrap_or(false));
        Ok(())
    }

    #[test]
    fn too_small_arena_is_refused() -> Result<(), StorageError> {
        let arena = HostArena::new(8192, 4096)?;
        assert!(IoBufPool::new(arena, 4097, 2).is_err());
        Ok(())
    }

    #[test]
    fn take_wait_gets_a_buffer_another_thread_returns() -> Result<(), StorageError> {
        let pool = IoBufPool::with_buffers(4096, 1, 4096)?;
        let held = pool
            .take()
            .ok_or(StorageError::InvalidConfig("empty".into()))?;
        // Nothing returns: the wait times out.
        assert!(pool.take_wait(Duration::from_millis(20)).is_none());
        let returner = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(held);
        });
        let got = pool.take_wait(Duration::from_secs(10));
        assert_eq!(got.map(|b| b.index()), Some(0));
        assert!(returner.join().is_ok());
        Ok(())
    }
}
