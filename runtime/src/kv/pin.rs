//! Page-locking the host arena. `cuMemHostRegister` of a 64 MiB chunk costs about 15 ms when its
//! pages are new (the kernel faults in and zeroes every page while the driver holds the lock
//! every other CUDA call of the process waits on) and about a third of that when they are
//! already in memory. The tier locks a chunk where a copy first needs it ([`ArenaPinner::ensure`]);
//! an [`ArenaPinner`] keeps a thread faulting in the pages of the chunks a little past the
//! highest one used so far (`MADV_POPULATE_WRITE`: no CUDA call, no lock the GPU's issuing
//! thread waits on), so that locking finds them in memory. The arena fills from its low end
//! (free slots are a stack handed out lowest first), so the next chunks a spill or a fetch
//! touches are the ones faulted in. Only [`PIN_AHEAD_BYTES`] past use, never the whole arena:
//! an unused budget stays uncommitted.
//!
//! Locking ahead on that thread was tried and not kept: each registration then stalled the
//! issuing thread's CUDA calls for its whole length, a burst of them at each GPU spill (0.3–0.6 s
//! a spill of an 8 × 32K prefill, against 12 ms for its copies alone).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use strata_kernels::CudaBackend;
use strata_kernels::cuda::HostRegistration;

use super::KvError;

/// How far past the highest chunk in use the thread faults pages in: two GPU spill batches of an
/// 8 × 32K run (about 1 GB each), so a spill finds its slots in memory.
pub(super) const PIN_AHEAD_BYTES: usize = 2 << 30;

/// What the tier and the pre-faulting thread share.
struct Shared {
    /// The thread faults in chunks below this.
    want: Mutex<usize>,
    /// Chunks the thread has faulted in (`0..faulted`).
    faulted: AtomicUsize,
    wake: Condvar,
    stop: AtomicBool,
}

/// The page-locked chunks of one host arena of `chunks.len()` chunks of `chunk` bytes at `base`,
/// and the thread that faults their pages in ahead of use.
pub(super) struct ArenaPinner {
    /// Chunk `c`'s registration, made where it is first needed.
    chunks: Vec<Option<HostRegistration>>,
    shared: Arc<Shared>,
    backend: CudaBackend,
    base: usize,
    arena_len: usize,
    chunk: usize,
    ahead: usize,
    thread: Option<JoinHandle<()>>,
}

impl ArenaPinner {
    /// Starts the thread for the arena `[base, base + arena_len)` in chunks of `chunk` bytes,
    /// to fault in `ahead` bytes past the highest chunk asked for; it touches nothing until
    /// [`ArenaPinner::ensure`] first asks for a chunk.
    ///
    /// # Safety
    /// The arena must stay mapped until this is dropped (the drop joins the thread and then
    /// unregisters every chunk).
    pub unsafe fn new(
        backend: CudaBackend,
        base: *mut u8,
        arena_len: usize,
        chunk: usize,
        ahead: usize,
    ) -> Self {
        let n = arena_len.div_ceil(chunk.max(1));
        let shared = Arc::new(Shared {
            want: Mutex::new(0),
            faulted: AtomicUsize::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (base, chunk) = (base as usize, chunk.max(1));
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("strata-prefault".into())
                .spawn(move || prefault_loop(&shared, base, arena_len, chunk))
                .ok()
        };
        Self {
            chunks: (0..n).map(|_| None).collect(),
            shared,
            backend,
            base,
            arena_len,
            chunk,
            ahead: ahead.div_ceil(chunk),
            thread,
        }
    }

    /// Page-locks the chunks covering `[offset, offset + len)` of the arena (those not yet),
    /// and moves the thread's goal past them.
    pub fn ensure(&mut self, offset: usize, len: usize) -> Result<(), KvError> {
        let (first, last) = (offset / self.chunk, (offset + len.max(1) - 1) / self.chunk);
        {
            let mut want = lock(&self.shared.want);
            let goal = (last + 1 + self.ahead).min(self.chunks.len());
            if goal > *want {
                *want = goal;
                self.shared.wake.notify_one();
            }
        }
        for c in first..=last.min(self.chunks.len() - 1) {
            if self.chunks[c].is_none() {
                self.chunks[c] = Some(register(
                    &self.backend,
                    self.base,
                    self.arena_len,
                    self.chunk,
                    c,
                )?);
            }
        }
        Ok(())
    }

    /// Chunks the thread has faulted in so far.
    #[cfg(test)]
    pub fn faulted(&self) -> usize {
        self.shared.faulted.load(Ordering::Acquire)
    }

    /// Chunks page-locked so far.
    #[cfg(test)]
    pub fn pinned(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_some()).count()
    }
}

impl Drop for ArenaPinner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _want = lock(&self.shared.want);
            self.shared.wake.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The lock guards a plain number: a panic while holding it leaves nothing half-made.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(
    backend: &CudaBackend,
    base: usize,
    arena_len: usize,
    chunk: usize,
    c: usize,
) -> Result<HostRegistration, KvError> {
    let start = c * chunk;
    let n = chunk.min(arena_len - start);
    let _span = tracing::debug_span!("register_host", bytes = n).entered();
    // SAFETY: `[start, start + n)` lies inside the arena, which stays mapped while the
    // pinner lives (`ArenaPinner::new`'s contract), and the registration is dropped with it.
    unsafe { backend.register_host((base + start) as *mut u8, n) }
        .map_err(|e| KvError::Gpu(e.to_string()))
}

/// The thread: fault in chunk after chunk up to the goal, sleep until it moves or the pinner
/// drops. Where the kernel cannot (before Linux 5.14), it stops: locking then faults the pages in.
fn prefault_loop(shared: &Shared, base: usize, arena_len: usize, chunk: usize) {
    let mut next = 0;
    loop {
        let goal = {
            let mut want = lock(&shared.want);
            while *want <= next && !shared.stop.load(Ordering::Acquire) {
                want = shared.wake.wait(want).unwrap_or_else(|e| e.into_inner());
            }
            *want
        };
        while next < goal {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let start = next * chunk;
            let n = chunk.min(arena_len - start);
            let _span = tracing::debug_span!("prefault_host", bytes = n).entered();
            // SAFETY: `[start, start + n)` lies inside the arena, mapped while the pinner lives
            // (`ArenaPinner::new`'s contract). MADV_POPULATE_WRITE only faults its pages in as if
            // written, without changing a byte: the tier may be using them meanwhile.
            let r = unsafe {
                libc::madvise(
                    (base + start) as *mut libc::c_void,
                    n,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                tracing::debug!(
                    "faulting the host arena in ahead of use stopped: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            next += 1;
            shared.faulted.store(next, Ordering::Release);
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use strata_kernels::testing::test_gpu;
    use strata_storage::ArenaSlots;

    use super::ArenaPinner;

    const MIB: usize = 1 << 20;

    fn wait_for(p: &ArenaPinner, chunks: usize) -> usize {
        let t0 = Instant::now();
        while p.faulted() < chunks && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        p.faulted()
    }

    #[test]
    fn locks_what_is_asked_and_faults_in_a_bounded_distance_ahead_in_the_background() {
        let Some(gpu) = test_gpu() else { return };
        let arena = ArenaSlots::with_slots(16, 4 * MIB).unwrap();
        let (base, len) = arena.raw_region();
        // 16 chunks of 4 MiB, faulted in 8 MiB (2 chunks) past the highest asked for.
        // SAFETY: `arena` outlives the pinner (dropped first, below).
        let mut p = unsafe { ArenaPinner::new(gpu.clone(), base, len, 4 * MIB, 8 * MIB) };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            (p.pinned(), p.faulted()),
            (0, 0),
            "nothing before it is asked for"
        );
        // Chunk 5, and no other, is locked by the time `ensure` returns; the thread then faults
        // in chunks 0..8 (through the asked-for chunk and two more) and stops there.
        p.ensure(5 * 4 * MIB + 100, 10).unwrap();
        assert_eq!(p.pinned(), 1);
        assert_eq!(wait_for(&p, 8), 8);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(p.faulted(), 8, "the thread stops two chunks past use");
        // A range across two chunks, to the arena's end: both locked, the goal stops at the end.
        p.ensure(len - 4 * MIB - 1, 2).unwrap();
        assert_eq!(p.pinned(), 3);
        assert_eq!(wait_for(&p, 16), 16);
        // Locking a locked chunk again registers nothing.
        p.ensure(5 * 4 * MIB, 4 * MIB).unwrap();
        assert_eq!(p.pinned(), 3);
        drop(p);
        drop(arena);
    }
}
