//! The io_uring backend: one ring with one owner (this struct), the staging pool registered once
//! as fixed buffers, the files registered once as fixed files, batched submission.
//!
//! Why a dedicated ring owner and not tokio-uring: strata's IO is issued by a few engine threads
//! that block on completions by design (the storage attention engine computes on each block as it
//! lands); an async runtime would add a reactor, a second thread model and `!Send` futures for no
//! gain, and tokio-uring owns its ring per thread, so we could not register our arena once. A
//! plain struct that owns the ring, is `Send`, and is driven by `wait()` keeps every raw pointer
//! and `user_data` value in this file.
//!
//! Invariants:
//! - every live operation sits in `ops[user_data]` and owns its `IoBuf`; the buffer leaves only
//!   in a `Completion`, after the kernel has posted the operation's final CQE;
//! - at most `depth` operations are in the kernel (`in_kernel`), which never exceeds the SQ size
//!   and is half the CQ size, so pushes never fail and the CQ never overflows; more submissions
//!   wait in `backlog`;
//! - every CQE result is checked: negative is `-errno` (EINTR/EAGAIN resubmitted, others reported),
//!   a short positive result resubmits the remainder, zero is end of file;
//! - waits in `io_uring_enter` are sliced by [`WAIT_SLICE`] (a timeout, kernel 5.11+), and an
//!   operation the kernel holds longer than `stall_after` ([`STALL_AFTER`] by default) without
//!   completing is cancelled (IORING_OP_ASYNC_CANCEL) and resubmitted, with a warning: a stuck
//!   request must cost seconds, never the job. Why: on Linux 6.18 an untimed wait for an
//!   O_DIRECT write was seen to block forever with the SQE consumed and no CQE posted (about one
//!   run in twelve of the fault fuzz test with other rings active); sliced waits made it go away
//!   (60 runs out of 60, no cancel needed), and the cancel is the backstop. Cancel CQEs carry
//!   [`CANCEL_TAG`] in `user_data` and are accounted apart from operations;
//! - drop order: drain in-flight operations, unregister buffers and files, close the ring, then
//!   release the pool (whose arena outlives the registration). If draining fails, the buffers of
//!   undrained operations are leaked rather than ever reused.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};

use super::{
    Completion, FileIdx, IoBackend, IoDir, MAX_TRANSIENT_RETRIES, check_submit, is_transient,
};
use crate::error::{StorageError, SubmitError};
use crate::pool::{IoBuf, IoBufPool};

/// io_uring allows at most this many registered buffers, each at most 1 GiB.
const MAX_FIXED_BUFFERS: usize = 1 << 14;
const MAX_FIXED_BUFFER_BYTES: usize = 1 << 30;

/// By default, an operation in the kernel this long without a completion is cancelled and
/// resubmitted ([`UringBackend::set_stall_timeout`]).
pub const STALL_AFTER: Duration = Duration::from_secs(5);
/// Longest single wait in `io_uring_enter` (or half the stall timeout), so stalls are noticed.
const WAIT_SLICE: Duration = Duration::from_millis(500);
/// Marks the `user_data` of cancel requests (operation ids are `u32`).
const CANCEL_TAG: u64 = 1 << 63;

struct Op {
    write: bool,
    file: FileIdx,
    offset: u64, // file offset of byte 0 of the buffer
    buf: IoBuf,
    len: usize,  // bytes to transfer
    done: usize, // bytes transferred so far (short transfers resubmit the rest)
    tag: u64,
    retries: u32,               // transient errors retried so far
    pushed_at: Option<Instant>, // when its current SQE was pushed (None: not in the kernel)
    cancelling: bool,           // a cancel for its current SQE was sent
}

/// The io_uring backend. See the module header for its invariants.
pub struct UringBackend {
    ring: IoUring,
    files: Vec<File>,
    fixed_files: bool,
    pool: IoBufPool, // the registered pool; keeps the arena alive past unregistration
    fixed_bufs: bool,
    ops: Vec<Option<Op>>, // slab indexed by user_data
    free_ops: Vec<u32>,
    backlog: VecDeque<u32>,
    in_kernel: usize,
    cancels_in_kernel: usize,
    depth: usize,
    ready: Vec<Completion>,
    timed_waits: bool, // the kernel takes a timeout on io_uring_enter (IORING_FEAT_EXT_ARG)
    stall_after: Duration,
    stalls: u64, // operations cancelled and resubmitted after `stall_after`
}

/// Creates a ring sized for `queue_depth` operations; the error is io_uring_setup's.
pub(super) fn create_ring(queue_depth: usize) -> io::Result<IoUring> {
    let entries = queue_depth.clamp(1, 4096).next_power_of_two() as u32;
    IoUring::builder().setup_cqsize(entries * 2).build(entries)
}

impl UringBackend {
    /// Creates a ring of `queue_depth` entries over `files` and registers `pool`'s buffers.
    pub fn new(
        files: Vec<File>,
        queue_depth: usize,
        pool: &IoBufPool,
    ) -> Result<Self, StorageError> {
        let ring = create_ring(queue_depth).map_err(|source| StorageError::Ring {
            op: "setup",
            source,
        })?;
        Ok(Self::with_ring(ring, files, queue_depth, pool))
    }

    pub(super) fn with_ring(
        ring: IoUring,
        files: Vec<File>,
        depth: usize,
        pool: &IoBufPool,
    ) -> Self {
        let depth = depth.clamp(1, ring.params().sq_entries() as usize);
        let fds: Vec<i32> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let fixed_files = match ring.submitter().register_files(&fds) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("io_uring: cannot register files ({e}); using plain descriptors");
                false
            }
        };
        let fixed_bufs = register_pool(&ring, pool);
        UringBackend {
            files,
            fixed_files,
            pool: pool.clone(),
            fixed_bufs,
            ops: Vec::new(),
            free_ops: Vec::new(),
            backlog: VecDeque::new(),
            in_kernel: 0,
            cancels_in_kernel: 0,
            depth,
            timed_waits: ring.params().is_feature_ext_arg(),
            ready: Vec::new(),
            stall_after: STALL_AFTER,
            stalls: 0,
            ring,
        }
    }

    /// Whether the staging buffers are registered (ReadFixed/WriteFixed are used for them).
    pub fn uses_fixed_buffers(&self) -> bool {
        self.fixed_bufs
    }

    /// Operations cancelled and resubmitted because the kernel held them too long.
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    /// How long the kernel may hold an operation before it is cancelled and resubmitted
    /// (default [`STALL_AFTER`]). Needs a kernel whose `io_uring_enter` takes a timeout (5.11+);
    /// returns whether stall detection is active.
    pub fn set_stall_timeout(&mut self, after: Duration) -> bool {
        self.stall_after = after;
        self.timed_waits
    }

    fn add_op(&mut self, op: Op) {
        let id = match self.free_ops.pop() {
            Some(id) => {
                self.ops[id as usize] = Some(op);
                id
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        };
        if self.in_kernel < self.depth {
            self.push_sqe(id);
        } else {
            self.backlog.push_back(id);
        }
    }

    /// Pushes the SQE for the remaining part of op `id`. Requires `in_kernel < depth`.
    fn push_sqe(&mut self, id: u32) {
        let Some(op) = self.ops[id as usize].as_mut() else {
            return;
        };
        op.pushed_at = Some(Instant::now());
        op.cancelling = false;
        let op = &*op;
        let remaining = (op.len - op.done) as u32;
        let offset = op.offset + op.done as u64;
        // SAFETY: `done < len <= buf.len()`, so the address is inside the op's buffer.
        let addr = unsafe { op.buf.as_ptr().add(op.done) };
        let fixed = self.fixed_bufs && self.pool.owns(&op.buf);
        let index = op.buf.index() as u16;
        let (write, files) = (op.write, &self.files);
        macro_rules! rw_entry {
            ($fd:expr) => {
                match (write, fixed) {
                    (false, true) => opcode::ReadFixed::new($fd, addr, remaining, index)
                        .offset(offset)
                        .build(),
                    (true, true) => opcode::WriteFixed::new($fd, addr, remaining, index)
                        .offset(offset)
                        .build(),
                    (false, false) => opcode::Read::new($fd, addr, remaining)
                        .offset(offset)
                        .build(),
                    (true, false) => opcode::Write::new($fd, addr, remaining)
                        .offset(offset)
                        .build(),
                }
            };
        }
        let entry: squeue::Entry = if self.fixed_files {
            rw_entry!(types::Fixed(op.file.0))
        } else {
            rw_entry!(types::Fd(files[op.file.0 as usize].as_raw_fd()))
        };
        let entry = entry.user_data(u64::from(id));
        // SAFETY: the SQE points into `op.buf`, which the op owns until its final CQE is reaped
        // (invariant of the slab), so the memory stays valid and unaliased for the kernel; the
        // file descriptor (or fixed file slot) stays open for the backend's whole life.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        // `in_kernel < depth <= sq_entries`, so the queue has room; if that ever broke, keep the
        // op queued rather than lose it.
        match pushed {
            Ok(()) => self.in_kernel += 1,
            Err(_) => self.backlog.push_front(id),
        }
    }

    fn refill(&mut self) {
        while self.in_kernel < self.depth {
            let Some(id) = self.backlog.pop_front() else {
                break;
            };
            self.push_sqe(id);
        }
    }

    /// Submits queued SQEs and waits for `want` CQEs (at most [`WAIT_SLICE`] when the kernel
    /// takes a timeout), retrying EINTR. True when the slice ran out with nothing to reap.
    fn enter(&mut self, want: usize) -> Result<bool, StorageError> {
        loop {
            let entered = if want > 0 && self.timed_waits {
                let slice = types::Timespec::from(WAIT_SLICE.min(self.stall_after / 2));
                let args = types::SubmitArgs::new().timespec(&slice);
                self.ring.submitter().submit_with_args(want, &args)
            } else {
                self.ring.submit_and_wait(want)
            };
            match entered {
                Ok(_) => return Ok(false),
                // ETIME: the slice ran out; the caller checks for stalls and waits again.
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the kernel wants completions reaped first; the caller reaps.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    return Ok(false);
                }
                Err(source) => {
                    return Err(StorageError::Ring {
                        op: "submit",
                        source,
                    });
                }
            }
        }
    }

    /// Reaps every posted CQE, resubmitting retries and short transfers.
    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in cqes {
            if user_data & CANCEL_TAG != 0 {
                self.cancels_in_kernel = self.cancels_in_kernel.saturating_sub(1);
                // 0: cancelled (its CQE follows); ENOENT: it completed meanwhile; EALREADY: it is
                // running and cannot be cancelled, so it will complete.
                tracing::debug!(
                    "io_uring: cancel of operation {} -> {result}",
                    user_data as u32
                );
                continue;
            }
            self.in_kernel = self.in_kernel.saturating_sub(1);
            self.on_cqe(user_data as u32, result);
        }
    }

    /// Sends a cancel for every operation the kernel has held past `stall_after`; each is
    /// resubmitted when its `-ECANCELED` completion arrives.
    fn cancel_stalled(&mut self) {
        let now = Instant::now();
        let stalled: Vec<u32> = self
            .ops
            .iter()
            .enumerate()
            .filter_map(|(id, op)| {
                let op = op.as_ref()?;
                let since = op.pushed_at?;
                (!op.cancelling && now.duration_since(since) >= self.stall_after)
                    .then_some(id as u32)
            })
            .collect();
        for id in stalled {
            let entry = opcode::AsyncCancel::new(u64::from(id))
                .build()
                .user_data(CANCEL_TAG | u64::from(id));
            // SAFETY: a cancel SQE carries no pointers; it names the operation by user_data.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                return; // the SQ is full: try again after the next submit
            }
            self.cancels_in_kernel += 1;
            if let Some(op) = self.ops[id as usize].as_mut() {
                op.cancelling = true;
                tracing::warn!(
                    "io_uring: {} of {} bytes at offset {} of file {} made no progress for {:?}; \
                     cancelling and resubmitting it",
                    if op.write { "write" } else { "read" },
                    op.len - op.done,
                    op.offset + op.done as u64,
                    op.file.0,
                    self.stall_after
                );
            }
        }
    }

    fn on_cqe(&mut self, id: u32, result: i32) {
        let Some(op) = self.ops.get_mut(id as usize).and_then(Option::as_mut) else {
            tracing::error!("io_uring: completion for unknown operation {id}");
            return;
        };
        op.pushed_at = None;
        // A cancelled request ends in ECANCELED, or EINTR when it was already running in a
        // kernel worker.
        let cancelled_by_us =
            op.cancelling && (result == -libc::ECANCELED || result == -libc::EINTR);
        if cancelled_by_us {
            self.stalls += 1;
        }
        let outcome = if result < 0 {
            if (cancelled_by_us || is_transient(-result)) && op.retries < MAX_TRANSIENT_RETRIES {
                op.retries += 1;
                None
            } else {
                Some(Err(io::Error::from_raw_os_error(-result)))
            }
        } else {
            op.done += result as usize;
            (result == 0 || op.done >= op.len).then_some(Ok(op.done))
        };
        match outcome {
            None => self.push_sqe(id),
            Some(result) => {
                if let Some(op) = self.ops[id as usize].take() {
                    self.free_ops.push(id);
                    self.ready.push(Completion {
                        tag: op.tag,
                        result,
                        buf: op.buf,
                    });
                }
            }
        }
    }

    fn live_ops(&self) -> usize {
        self.ops.len() - self.free_ops.len()
    }
}

/// Registers the pool's buffers as fixed buffers; false (with a warning) when it cannot.
fn register_pool(ring: &IoUring, pool: &IoBufPool) -> bool {
    if pool.count() > MAX_FIXED_BUFFERS || pool.buf_bytes() > MAX_FIXED_BUFFER_BYTES {
        tracing::warn!("io_uring: pool too large to register; using unregistered buffers");
        return false;
    }
    let iovecs: Vec<libc::iovec> = pool
        .regions()
        .into_iter()
        .map(|(base, len)| libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        })
        .collect();
    // SAFETY: each iovec is one buffer of the pool's arena; `self.pool` keeps the arena alive
    // until after `unregister_buffers` in Drop, so the registration never outlives the memory.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "io_uring: cannot register {} staging buffers ({e}); using unregistered \
                 buffers (raise `ulimit -l` to allow registration)",
                pool.count()
            );
            false
        }
    }
}

impl IoBackend for UringBackend {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn submit(
        &mut self,
        dir: IoDir,
        file: FileIdx,
        offset: u64,
        buf: IoBuf,
        len: usize,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let write = dir == IoDir::Write;
        let buf = check_submit(self.files.len(), file, buf, len)?;
        self.add_op(Op {
            write,
            file,
            offset,
            buf,
            len,
            done: 0,
            tag,
            retries: 0,
            pushed_at: None,
            cancelling: false,
        });
        Ok(())
    }

    fn wait(&mut self, min: usize) -> Result<Vec<Completion>, StorageError> {
        let min = min.min(self.in_flight());
        loop {
            self.refill();
            let want = usize::from(self.ready.len() < min && self.in_kernel > 0);
            // Only a wait that went a whole slice without a completion looks for stalled ops.
            let timed_out = self.enter(want)?;
            self.reap();
            if timed_out {
                self.cancel_stalled();
            }
            if self.ready.len() >= min || (self.in_kernel == 0 && self.backlog.is_empty()) {
                return Ok(std::mem::take(&mut self.ready));
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.live_ops() + self.ready.len()
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // 1. Drain: ops never pushed are simply dropped; ops in the kernel are waited for.
        for id in std::mem::take(&mut self.backlog) {
            self.ops[id as usize] = None;
        }
        while self.in_kernel + self.cancels_in_kernel > 0 {
            let entered = self.enter(1);
            if let Err(e) = &entered {
                tracing::error!(
                    "io_uring: cannot drain {} in-flight operations ({e}); leaking their buffers",
                    self.in_kernel
                );
                for op in self.ops.drain(..).flatten() {
                    std::mem::forget(op.buf);
                }
                break;
            }
            self.reap();
            if matches!(entered, Ok(true)) {
                self.cancel_stalled();
            }
            // Retries and remainders pushed by `reap` are dropped unsubmitted from the backlog.
            for id in std::mem::take(&mut self.backlog) {
                self.ops[id as usize] = None;
            }
        }
        // 2. Unregister, 3. the ring closes and the pool is released as fields drop.
        if self.fixed_bufs {
            let _ = self.ring.submitter().unregister_buffers();
        }
        if self.fixed_files {
            let _ = self.ring.submitter().unregister_files();
        }
    }
}
