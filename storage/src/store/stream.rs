//! The block store's IO loops: batched writes and streaming reads over the backend.
//!
//! Both loops keep up to `queue_depth` operations in flight (one staging buffer each), submit new
//! operations as soon as a buffer comes back, and handle each completion as it arrives, so a read
//! caller's computation on block `k` overlaps the reads of the blocks after it.
//!
//! Retry policy per operation: short transfers and EINTR/EAGAIN up to [`MAX_SHORT_RETRIES`], EIO
//! up to [`MAX_EIO_RETRIES`], re-reads after a checksum mismatch up to [`MAX_CORRUPT_RETRIES`]
//! (a transient flip on the bus or in the page cache reads clean the next time; a block that is
//! corrupt on disk fails every time and is reported); ENOSPC is reported at once.
//! Invariant: when a call returns an error, every operation it started has completed (drained),
//! so no buffer or completion of a failed call leaks into the next one.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use super::{BlockStore, DiskSlot, SlotState};
use crate::checksum::checksum64;
use crate::error::StorageError;
use crate::io::{Completion, FileIdx, IoBackend};

pub const MAX_EIO_RETRIES: u32 = 3;
pub const MAX_SHORT_RETRIES: u32 = 3;
pub const MAX_CORRUPT_RETRIES: u32 = 3;
/// How long a read waits for its caller to return a staging buffer when it holds them all.
pub const BUFFER_WAIT: Duration = Duration::from_secs(10);

/// A block read back, checksum verified, still in its staging buffer; the buffer returns to the
/// store's pool when this is dropped.
pub struct ReadBlock {
    buf: crate::pool::IoBuf,
    len: usize,
}

impl ReadBlock {
    /// The block's bytes, as written.
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[..self.len]
    }
}

#[derive(Clone, Copy, Default)]
struct Attempts {
    eio: u32,
    short: u32,
    corrupt: u32,
}

enum Verdict {
    Done,
    Retry,
    Fail(StorageError),
}

/// Where an operation went, for error messages.
struct Site<'a> {
    path: &'a std::path::Path,
    offset: u64,
}

/// Judges one completion's result: done, retry, or a typed error naming path and offset.
fn classify(
    result: &io::Result<usize>,
    need: usize,
    att: &mut Attempts,
    write: bool,
    site: Site<'_>,
) -> Verdict {
    let path = site.path.to_path_buf();
    let offset = site.offset;
    match result {
        Ok(n) if *n >= need => Verdict::Done,
        Ok(n) if att.short < MAX_SHORT_RETRIES => {
            att.short += 1;
            tracing::debug!(
                "short transfer ({n} of {need} bytes) at {}:{offset}",
                path.display()
            );
            Verdict::Retry
        }
        Ok(n) => {
            let op = if write { "write" } else { "read" };
            Verdict::Fail(StorageError::ShortIo {
                op,
                path,
                offset,
                expected: need,
                got: *n,
            })
        }
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOSPC) => Verdict::Fail(StorageError::NoSpace { path, offset }),
            Some(libc::EIO) if att.eio < MAX_EIO_RETRIES => {
                att.eio += 1;
                Verdict::Retry
            }
            Some(libc::EINTR | libc::EAGAIN) if att.short < MAX_SHORT_RETRIES => {
                att.short += 1;
                Verdict::Retry
            }
            code => {
                let source = match code {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(e.kind(), e.to_string()),
                };
                Verdict::Fail(StorageError::Io {
                    path,
                    offset,
                    len: need,
                    source,
                })
            }
        },
    }
}

impl BlockStore {
    /// Writes each `(slot, bytes)` (at most `slot_bytes` bytes) and records its checksum.
    /// Slots must be allocated and appear once. On error no slot of this call is readable (reads
    /// fail with `InvalidSlot`) until written again.
    pub fn write_blocks(&mut self, items: &[(DiskSlot, &[u8])]) -> Result<(), StorageError> {
        self.validate_write(items)?;
        let start = Instant::now();
        let result = self.write_all(items);
        if result.is_err() {
            self.drain();
            // All or nothing per call: no slot of a failed call reads back.
            for &(slot, _) in items {
                if let Some(state @ SlotState::Written { .. }) = self.state.get_mut(slot.0 as usize)
                {
                    *state = SlotState::Empty;
                }
            }
        }
        self.stats.write_seconds += start.elapsed().as_secs_f64();
        result
    }

    /// Reads `slots` and calls `on_block(index in slots, bytes)` for each as its read completes
    /// (completion order), after verifying its checksum; `bytes` is what was written. Stops at
    /// the first error, storage or callback, after draining the reads still in flight. The
    /// callback's error type absorbs storage errors (`E: From<StorageError>`).
    pub fn read_blocks<E: From<StorageError>>(
        &mut self,
        slots: &[DiskSlot],
        mut on_block: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_blocks_owned(slots, |i, block| on_block(i, block.bytes()))
    }

    /// [`BlockStore::read_blocks`] handing each block over in its staging buffer, so the caller
    /// can work on it elsewhere (other threads) while this loop goes on reading: the buffer
    /// returns to the pool, for the next read, when the caller drops the [`ReadBlock`]. With
    /// every buffer held and nothing in flight, the loop waits up to [`BUFFER_WAIT`] for one.
    pub fn read_blocks_owned<E: From<StorageError>>(
        &mut self,
        slots: &[DiskSlot],
        on_block: impl FnMut(usize, ReadBlock) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_stream(slots, Vec::new, on_block)
    }

    /// [`BlockStore::read_blocks_owned`] over a stream the caller can extend while it runs:
    /// whenever every slot so far has been submitted, `more()` may return further slots, which
    /// are read after them (their indices continue `slots`'). The queue then never drains
    /// between one batch of reads and the next, as it does between two calls. `more` must not
    /// block; an empty answer ends the stream once the reads in flight complete.
    pub fn read_stream<E: From<StorageError>>(
        &mut self,
        slots: &[DiskSlot],
        mut more: impl FnMut() -> Vec<DiskSlot>,
        mut on_block: impl FnMut(usize, ReadBlock) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = Instant::now();
        let mut in_callback = Duration::ZERO;
        let result = self.read_all(slots.to_vec(), &mut more, &mut |i, block| {
            let t = Instant::now();
            let outcome = on_block(i, block);
            in_callback += t.elapsed();
            outcome
        });
        if result.is_err() {
            self.drain();
        }
        self.stats.read_seconds += start.elapsed().saturating_sub(in_callback).as_secs_f64();
        result
    }

    /// Each slot's written length and checksum, or `InvalidSlot` for one never written.
    fn expected(&self, slots: &[DiskSlot]) -> Result<Vec<(usize, u64)>, StorageError> {
        slots
            .iter()
            .map(|&slot| match self.check_slot(slot)? {
                SlotState::Written { len, sum } => Ok((len, sum)),
                _ => Err(StorageError::InvalidSlot {
                    slot: slot.0,
                    reason: "never written",
                }),
            })
            .collect()
    }

    fn check_slot(&self, slot: DiskSlot) -> Result<SlotState, StorageError> {
        match self.state.get(slot.0 as usize) {
            None => Err(StorageError::InvalidSlot {
                slot: slot.0,
                reason: "out of range",
            }),
            Some(SlotState::Free) => Err(StorageError::InvalidSlot {
                slot: slot.0,
                reason: "free",
            }),
            Some(state) => Ok(*state),
        }
    }

    fn io_len(&self, len: usize) -> usize {
        len.next_multiple_of(self.block_bytes as usize)
    }

    fn validate_write(&self, items: &[(DiskSlot, &[u8])]) -> Result<(), StorageError> {
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        for &(slot, data) in items {
            self.check_slot(slot)?;
            if data.len() as u64 > self.slot_bytes {
                return Err(StorageError::BlockTooLarge {
                    len: data.len(),
                    slot_bytes: self.slot_bytes,
                });
            }
            if !seen.insert(slot) {
                return Err(StorageError::InvalidSlot {
                    slot: slot.0,
                    reason: "twice in one write",
                });
            }
        }
        Ok(())
    }

    fn write_all(&mut self, items: &[(DiskSlot, &[u8])]) -> Result<(), StorageError> {
        for &(slot, _) in items {
            self.state[slot.0 as usize] = SlotState::Empty;
        }
        let mut queue: VecDeque<usize> = (0..items.len()).collect();
        let mut attempts = vec![Attempts::default(); items.len()];
        let mut arrived = VecDeque::new();
        loop {
            self.top_up(&mut queue, &mut arrived, |store, i, buf| {
                let (slot, data) = items[i];
                let io_len = store.io_len(data.len().max(1));
                let bytes = buf.as_mut_slice();
                bytes[..data.len()].copy_from_slice(data);
                bytes[data.len()..io_len].fill(0);
                let (file, offset) = store.locate(slot);
                (file, offset, Some(io_len))
            })?;
            let Some(c) = self.next_completion(&mut arrived)? else {
                return Ok(());
            };
            let i = c.tag as usize;
            let (slot, data) = items[i];
            let need = self.io_len(data.len().max(1));
            match self.judge(&c, slot, need, &mut attempts[i], true) {
                Verdict::Done => {
                    let sum = checksum64(data);
                    self.state[slot.0 as usize] = SlotState::Written {
                        len: data.len(),
                        sum,
                    };
                    self.stats.bytes_written += need as u64;
                    self.stats.writes += 1;
                }
                Verdict::Retry => {
                    self.stats.retries += 1;
                    queue.push_front(i);
                }
                Verdict::Fail(e) => return Err(e),
            }
        }
    }

    fn read_all<E: From<StorageError>>(
        &mut self,
        mut slots: Vec<DiskSlot>,
        more: &mut impl FnMut() -> Vec<DiskSlot>,
        on_block: &mut impl FnMut(usize, ReadBlock) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut expect = self.expected(&slots)?;
        let mut queue: VecDeque<usize> = (0..slots.len()).collect();
        let mut attempts = vec![Attempts::default(); slots.len()];
        let mut arrived = VecDeque::new();
        loop {
            if queue.is_empty() {
                let extra = more();
                expect.extend(self.expected(&extra)?);
                queue.extend(slots.len()..slots.len() + extra.len());
                attempts.resize(slots.len() + extra.len(), Attempts::default());
                slots.extend(extra);
            }
            self.top_up(&mut queue, &mut arrived, |store, i, _| {
                let (file, offset) = store.locate(slots[i]);
                (file, offset, None)
            })?;
            let Some(c) = self.next_completion(&mut arrived)? else {
                return Ok(());
            };
            let i = c.tag as usize;
            let (len, sum) = expect[i];
            let need = self.io_len(len.max(1));
            let mut verdict = self.judge(&c, slots[i], need, &mut attempts[i], false);
            if matches!(verdict, Verdict::Done) && checksum64(&c.buf.as_slice()[..len]) != sum {
                self.stats.corrupt_reads += 1;
                verdict = self.corrupt_verdict(slots[i], &mut attempts[i]);
            }
            match verdict {
                Verdict::Done => {
                    self.stats.bytes_read += c.result.as_ref().map_or(0, |n| *n) as u64;
                    self.stats.reads += 1;
                    on_block(i, ReadBlock { buf: c.buf, len })?;
                }
                Verdict::Retry => {
                    self.stats.retries += 1;
                    queue.push_front(i);
                }
                Verdict::Fail(e) => return Err(e.into()),
            }
        }
    }

    fn corrupt_verdict(&self, slot: DiskSlot, att: &mut Attempts) -> Verdict {
        if att.corrupt < MAX_CORRUPT_RETRIES {
            att.corrupt += 1;
            return Verdict::Retry;
        }
        let (file, offset) = self.locate(slot);
        let path = self.files.files[file.0 as usize].path.clone();
        Verdict::Fail(StorageError::Corrupt {
            slot: slot.0,
            path,
            offset,
        })
    }

    fn judge(
        &self,
        c: &Completion,
        slot: DiskSlot,
        need: usize,
        att: &mut Attempts,
        write: bool,
    ) -> Verdict {
        let (file, offset) = self.locate(slot);
        let site = Site {
            path: &self.files.files[file.0 as usize].path,
            offset,
        };
        classify(&c.result, need, att, write, site)
    }

    /// Submits queued items while staging buffers are free; `prepare` fills the buffer and
    /// returns `(file, offset, Some(write length) | None for a read)`. Submits the batch and
    /// collects whatever already completed into `arrived`.
    fn top_up(
        &mut self,
        queue: &mut VecDeque<usize>,
        arrived: &mut VecDeque<Completion>,
        mut prepare: impl FnMut(
            &BlockStore,
            usize,
            &mut crate::pool::IoBuf,
        ) -> (FileIdx, u64, Option<usize>),
    ) -> Result<(), StorageError> {
        let mut submitted = false;
        while self.in_flight() < self.queue_depth {
            let Some(&i) = queue.front() else { break };
            let mut buf = match self.pool.take() {
                Some(buf) => buf,
                // Nothing in flight or waiting, so nothing completes until the caller drops a
                // block it holds (owned reads).
                None if self.in_flight() == 0 && arrived.is_empty() => {
                    match self.pool.take_wait(BUFFER_WAIT) {
                        Some(buf) => buf,
                        None => {
                            return Err(StorageError::InvalidConfig(format!(
                                "no staging buffer came back within {} s",
                                BUFFER_WAIT.as_secs()
                            )));
                        }
                    }
                }
                None => break,
            };
            queue.pop_front();
            let (file, offset, write_len) = prepare(self, i, &mut buf);
            let backend = self.backend_mut()?;
            let sent = match write_len {
                Some(len) => backend.submit_write(file, offset, buf, len, i as u64),
                None => backend.submit_read(file, offset, buf, i as u64),
            };
            sent.map_err(|e| e.error)?;
            submitted = true;
        }
        if submitted {
            arrived.extend(self.backend_mut()?.wait(0)?);
        }
        Ok(())
    }

    /// The next completion: one already collected, or wait for one; `None` when all are done.
    fn next_completion(
        &mut self,
        arrived: &mut VecDeque<Completion>,
    ) -> Result<Option<Completion>, StorageError> {
        if arrived.is_empty() && self.in_flight() > 0 {
            arrived.extend(self.backend_mut()?.wait(1)?);
        }
        Ok(arrived.pop_front())
    }

    fn in_flight(&self) -> usize {
        self.backend.as_ref().map_or(0, |b| b.in_flight())
    }

    fn backend_mut(&mut self) -> Result<&mut Box<dyn IoBackend>, StorageError> {
        self.backend.as_mut().ok_or(StorageError::WorkersGone)
    }

    /// Waits for every in-flight operation and drops the results (after an error).
    pub(super) fn drain(&mut self) {
        while let Some(backend) = self.backend.as_mut() {
            let pending = backend.in_flight();
            if pending == 0 {
                break;
            }
            if let Err(e) = backend.wait(pending) {
                tracing::error!("block store: cannot drain {pending} operations: {e}");
                break;
            }
        }
    }
}
