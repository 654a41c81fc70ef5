//! Host ↔ device copies, each timed by a pair of events, so a run can say how many bytes crossed
//! PCIe each way and how long they took ([`CudaBackend::copy_stats`]); uploads under
//! [`TIMED_UPLOAD_MIN`] are only counted, apart (their events cost more host time than they
//! take to copy).
//!
//! Bulk copies run on a stream per direction: weight prefetch on the copy stream, KV spills on
//! the spill stream (a spill the host attention waits for must not queue behind the next
//! layer's weights). The small transfers go through page-locked staging elsewhere:
//! - queries down on a stream of their own: on the copy stream they would queue behind the next
//!   layer's weight prefetch, and the host attention that waits for them would start only once
//!   those weights had landed, serialising the two streams the block schedule means to overlap;
//! - everything up to [`SMALL_UPLOAD_BYTES`] (block tables, KV slots, token ids, host attention's
//!   partials, the host MLP share's output) in order on the compute stream, from a ring of
//!   staging buffers that a copy kernel reads over PCIe: the host enqueues and goes on, and no
//!   copy engine is involved. Host-to-device copies from different streams queue on the same
//!   engine: on an H100, each of these few-kilobyte copies waited behind the next layer's weights
//!   and held the compute stream with it (OPT-30B's decode step went from 928 to 550 ms without
//!   them). (On a stream of its own a copy would have to wait for the compute stream's
//!   allocation of its destination, and the host for the copy before reusing the buffer.)

use cudarc::driver::sys::{CUdeviceptr, CUevent_flags};
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, PinnedHostSlice,
    PushKernelArg,
};

use super::{CudaBackend, CudaTensor, Inner, device_err, kernels};
use crate::Result;

/// Bytes and timed seconds (between each copy's two events) per direction since the backend
/// started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CopyStats {
    pub h2d_bytes: u64,
    pub h2d_seconds: f64,
    pub d2h_bytes: u64,
    pub d2h_seconds: f64,
    /// Bytes of uploads under [`TIMED_UPLOAD_MIN`] (block tables, KV slots, positions), copied
    /// in order on the compute stream and not timed: not in `h2d_bytes`.
    pub h2d_small_bytes: u64,
}

/// A copy to the host in flight ([`CudaBackend::download_async`]): its page-locked staging
/// buffer, the values it will hold, and the event that marks the copy done.
pub struct PendingDownload {
    pub(crate) host: Option<PinnedHostSlice<f32>>,
    pub(crate) n: usize,
    pub(crate) done: CudaEvent,
    /// A device buffer the copy reads that nothing else owns (gathered blocks): freed only
    /// after the copy has landed.
    pub(crate) device: Option<CudaSlice<f32>>,
}

impl Drop for PendingDownload {
    fn drop(&mut self) {
        // A download dropped unread (an error on the way) must not free its buffer under the
        // copy; a failed wait leaves nothing better to do than go on.
        if self.host.is_some() {
            let _ = self.done.synchronize();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    H2d,
    D2h,
}

/// Timed copies whose events have not been read yet, and the totals of those that have; and the
/// page-locked staging buffers of [`CudaBackend::download`] and [`CudaBackend::upload`], kept
/// and grown rather than allocated per call (a page-locked allocation costs milliseconds).
#[derive(Default)]
pub(crate) struct CopyLog {
    pending: Vec<(CudaEvent, CudaEvent, Dir, u64)>,
    totals: CopyStats,
    /// Download staging not in use, at most [`DOWNLOAD_STAGING_KEPT`].
    down: Vec<PinnedHostSlice<f32>>,
    /// Upload staging, oldest use first.
    ups: std::collections::VecDeque<UploadSlot>,
}

/// A staging buffer of the upload ring, with what each use needs made once: its device address
/// and the event marking its last copy done. An upload is on every layer's path (a decode step
/// makes about a hundred), where creating, recording and destroying three events and asking the
/// driver for the mapping each time cost 10-25 µs of host time per upload.
struct UploadSlot {
    buf: PinnedHostSlice<f32>,
    /// The device's address of `buf` (page-locked and mapped), `None` where the driver gave none.
    mapped: Option<CUdeviceptr>,
    /// Recorded on the compute stream after the slot's last copy (`recorded`: at least once).
    done: CudaEvent,
    recorded: bool,
}

/// Uploads from this size are timed by a pair of events and counted in
/// [`CopyStats::h2d_bytes`]; smaller ones (a few kilobytes of metadata, on every layer) only in
/// [`CopyStats::h2d_small_bytes`]: their events cost more host time than the copy takes.
pub const TIMED_UPLOAD_MIN: usize = 64 << 10;

/// Download staging buffers kept for reuse: one per download the runtime keeps in flight (two,
/// blocks landing in host memory) and one for a tensor downloaded meanwhile. Allocating
/// page-locked memory costs milliseconds per buffer, so none is freed while in this bound.
const DOWNLOAD_STAGING_KEPT: usize = 3;

/// Upload staging buffers in the ring: an upload reuses the one used this many uploads ago,
/// whose copy has long run by then (a layer makes a handful: block tables, slots, partials).
const UPLOAD_RING: usize = 16;

/// `slot`'s buffer with room for `n` values, (re)allocated when too small.
fn staging<'s>(
    be: &Inner,
    op: &'static str,
    slot: &'s mut Option<PinnedHostSlice<f32>>,
    n: usize,
) -> Result<&'s mut PinnedHostSlice<f32>> {
    if slot.as_ref().is_none_or(|b| b.len() < n) {
        *slot = None;
        // SAFETY: page-locked host memory of n.next_power_of_two() f32; every use writes the
        // part it reads (a copy into it, or copy_from_slice) first.
        let b = unsafe {
            be.ctx.alloc_pinned_with_flags::<f32>(
                n.next_power_of_two(),
                cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP,
            )
        }
        .map_err(|e| device_err(op, e))?;
        *slot = Some(b);
    }
    slot.as_mut()
        .ok_or_else(|| device_err(op, "staging buffer"))
}

/// Pending entries past which the oldest half is folded into the totals.
const FOLD_AT: usize = 512;

impl CopyLog {
    fn fold(&mut self, n: usize) -> Result<()> {
        for (start, end, dir, bytes) in self.pending.drain(..n.min(self.pending.len())) {
            end.synchronize().map_err(|e| device_err("copy_stats", e))?;
            let s = start
                .elapsed_ms(&end)
                .map_err(|e| device_err("copy_stats", e))? as f64
                / 1e3;
            match dir {
                Dir::H2d => {
                    self.totals.h2d_bytes += bytes;
                    self.totals.h2d_seconds += s;
                }
                Dir::D2h => {
                    self.totals.d2h_bytes += bytes;
                    self.totals.d2h_seconds += s;
                }
            }
        }
        Ok(())
    }
}

impl Inner {
    /// Runs `enqueue` (copies on the copy stream) between two timing events and logs them.
    pub(crate) fn timed_copy<R>(
        &self,
        op: &'static str,
        dir: Dir,
        bytes: usize,
        enqueue: impl FnOnce(&CudaStream) -> Result<R>,
    ) -> Result<R> {
        self.timed_copy_on(&self.copy, op, dir, bytes, enqueue)
    }

    /// Copies the first `words` f32 words of `src` into page-locked staging on `stream`, ordered
    /// after the compute stream's work so far (which produced them, and nothing enqueued
    /// later), and returns the pending download.
    pub(crate) fn download_words_on(
        &self,
        stream: &CudaStream,
        op: &'static str,
        src: &CudaSlice<f32>,
        words: usize,
    ) -> Result<PendingDownload> {
        let ready = self
            .stream
            .record_event(None)
            .map_err(|e| device_err(op, e))?;
        stream.wait(&ready).map_err(|e| device_err(op, e))?;
        // The staging buffer is taken out of the log while in use; a second download in flight
        // gets a buffer of its own.
        let mut host = self.take_download_staging(op)?;
        let enqueued = (|| {
            let buf = staging(self, op, &mut host, words.max(1))?;
            if words > 0 {
                self.timed_copy_on(stream, op, Dir::D2h, words * 4, |s| {
                    let (ptr, _sync) = src.device_ptr(s);
                    let dst = &mut buf.as_mut_slice().map_err(|e| device_err(op, e))?[..words];
                    // SAFETY: `src` holds at least `words` f32 (the caller's buffer), `dst` as
                    // many; the copy is ordered after the producer by the wait above, and the
                    // staging buffer moves into the PendingDownload, which waits for the copy
                    // before it reads, reuses or frees it (the caller keeps `src` alive as long).
                    unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, ptr, s.cu_stream()) }
                        .map_err(|e| device_err(op, e))
                })?;
            }
            stream.record_event(None).map_err(|e| device_err(op, e))
        })();
        match enqueued {
            Ok(done) => Ok(PendingDownload {
                host,
                n: words,
                done,
                device: None,
            }),
            Err(e) => {
                // Nothing may still write into the buffer when it goes back.
                stream.synchronize().map_err(|e| device_err(op, e))?;
                self.put_download_staging(host);
                Err(e)
            }
        }
    }

    /// [`Inner::timed_copy`] on stream `s`.
    pub(crate) fn timed_copy_on<R>(
        &self,
        s: &CudaStream,
        op: &'static str,
        dir: Dir,
        bytes: usize,
        enqueue: impl FnOnce(&CudaStream) -> Result<R>,
    ) -> Result<R> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = s.record_event(timing).map_err(|e| device_err(op, e))?;
        let r = enqueue(s)?;
        let end = s.record_event(timing).map_err(|e| device_err(op, e))?;
        let mut log = self
            .copies
            .lock()
            .map_err(|_| device_err(op, "copy log poisoned"))?;
        log.pending.push((start, end, dir, bytes as u64));
        if log.pending.len() >= FOLD_AT {
            log.fold(FOLD_AT / 2)?;
        }
        Ok(r)
    }
}

impl CudaBackend {
    /// Bytes and time of every timed copy so far (the copy, spill and transfer streams, and the
    /// uploads on the compute stream; waits for the ones still in flight).
    pub fn copy_stats(&self) -> Result<CopyStats> {
        let mut log = self
            .inner
            .copies
            .lock()
            .map_err(|_| device_err("copy_stats", "copy log poisoned"))?;
        let n = log.pending.len();
        log.fold(n)?;
        Ok(log.totals)
    }

    /// Copies `t` to the host on the small-transfer stream, after the compute stream's work so
    /// far, and waits for it (the caller needs the values now).
    pub fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let pending = self.download_async(t)?;
        self.wait_download(pending)
    }

    /// Starts copying `t` to the host on the small-transfer stream, ordered after the compute
    /// stream's work so far (and nothing enqueued later): the host can wait for it with
    /// [`CudaBackend::wait_download`] while the compute stream goes on with later kernels.
    pub fn download_async(&self, t: &CudaTensor) -> Result<PendingDownload> {
        let be = &self.inner;
        let op = "download";
        let src = be.buf(op, t)?;
        be.download_words_on(&be.xfer, op, src, t.rows * t.cols)
    }

    /// Waits for a download started by [`CudaBackend::download_async`] and returns its values.
    pub fn wait_download(&self, p: PendingDownload) -> Result<Vec<f32>> {
        self.wait_download_with(p, <[f32]>::to_vec)
    }

    /// Waits for a download and hands its bytes to `f` in the page-locked buffer they landed in
    /// (no copy out: the caller puts them where they go), then recycles the buffer.
    pub fn wait_download_bytes<R>(
        &self,
        p: PendingDownload,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        self.wait_download_with(p, |v| f(as_bytes(v)))
    }

    /// Waits for a download, hands its values to `f` where they landed, then recycles the
    /// staging buffer (and frees the device buffer the copy read, if it owned one).
    pub fn wait_download_with<R>(
        &self,
        mut p: PendingDownload,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<R> {
        let op = "download";
        p.done.synchronize().map_err(|e| device_err(op, e))?;
        p.device = None;
        let host = p.host.take();
        let out = match &host {
            Some(h) => Ok(f(&h.as_slice().map_err(|e| device_err(op, e))?[..p.n])),
            None => Err(device_err(op, "staging buffer")),
        };
        self.inner.put_download_staging(host);
        out
    }

    /// A new `[rows, cols]` tensor holding `data`, copied on the compute stream from
    /// page-locked staging (see [`Inner::upload_bytes`]): kernels enqueued later see it, and the
    /// host does not wait.
    pub fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaTensor> {
        let be = &self.inner;
        let op = "upload";
        super::check_len(op, "data", data.len(), rows * cols)?;
        let mut out = be.output(op, data.len())?;
        {
            let (ptr, _sync) = out.device_ptr_mut(&be.stream);
            // SAFETY: `out` holds data.len() f32 (16-byte aligned, as every allocation), live
            // on the compute stream, where the copy runs.
            unsafe { be.upload_bytes(op, ptr, as_bytes(data)) }?;
        }
        Ok(Inner::tensor(rows, cols, out))
    }
}

/// Element types that are plain bytes (no padding, every bit pattern a value), so a slice of
/// them may be uploaded as bytes.
///
/// # Safety
/// Only for types with no padding bytes.
pub(crate) unsafe trait PlainBytes: DeviceRepr {}
// SAFETY: primitive numbers, no padding.
unsafe impl PlainBytes for u32 {}
// SAFETY: as above.
unsafe impl PlainBytes for u64 {}
// SAFETY: as above.
unsafe impl PlainBytes for i32 {}
// SAFETY: as above.
unsafe impl PlainBytes for f32 {}
// SAFETY: a 16-bit float is a u16, no padding.
unsafe impl PlainBytes for half::f16 {}
// SAFETY: as above.
unsafe impl PlainBytes for half::bf16 {}

pub(crate) fn as_bytes<T: PlainBytes>(v: &[T]) -> &[u8] {
    // SAFETY: T has no padding (PlainBytes), so every byte of the slice is initialised; the
    // view borrows `v` and covers exactly its bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Uploads up to this size go through [`Inner::upload_bytes`]; larger ones (weights at load
/// time) through a copy engine, which moves bulk data faster.
pub(crate) const SMALL_UPLOAD_BYTES: usize = 1 << 20;

impl Inner {
    /// Enqueues on the compute stream a copy of `src` (page-locked host memory, mapped for the
    /// device: allocated or registered with the DEVICEMAP flag) to `dst` by the
    /// `copy_from_host` kernel, the SMs reading it over PCIe: no copy engine, so nothing queues
    /// behind bulk copies on other streams. Returns false, having enqueued nothing, where the
    /// memory is not mapped or either address is not 16-byte aligned (the caller copies it
    /// another way).
    ///
    /// # Safety
    /// `dst` must address `src.len()` writable device bytes and `src` stay alive and unwritten
    /// until the compute stream has run the copy.
    pub(crate) unsafe fn copy_from_mapped_host(
        &self,
        op: &'static str,
        dst: CUdeviceptr,
        src: &[u8],
    ) -> Result<bool> {
        if src.is_empty() {
            return Ok(true);
        }
        let Some(from) = self.mapped_device_ptr(src.as_ptr()) else {
            return Ok(false);
        };
        // SAFETY: `from` is the device's address of `src` (the caller's contract for `src`).
        unsafe { self.copy_from_device_view(op, dst, from, src.len()) }
    }

    /// The device's address of `host`, a byte of page-locked host memory mapped for this
    /// context's device, or `None` where it is not.
    pub(crate) fn mapped_device_ptr(&self, host: *const u8) -> Option<CUdeviceptr> {
        let mut dev: CUdeviceptr = 0;
        // SAFETY: a query on a host address; it fails unless the address lies in page-locked
        // memory mapped for this context's device.
        let r = unsafe {
            cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut dev, host.cast_mut().cast(), 0)
        };
        (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(dev)
    }

    /// Enqueues the `copy_from_host` kernel copying `n` bytes from `from`, the device's address of
    /// mapped page-locked host memory, to `dst`; false, having enqueued nothing, unless both are
    /// 16-byte aligned.
    ///
    /// # Safety
    /// `dst` must address `n` writable device bytes and `from` `n` mapped host bytes, alive and
    /// unwritten until the compute stream has run the copy.
    unsafe fn copy_from_device_view(
        &self,
        op: &'static str,
        dst: CUdeviceptr,
        from: CUdeviceptr,
        n: usize,
    ) -> Result<bool> {
        if n == 0 {
            return Ok(true);
        }
        if !(dst | from).is_multiple_of(16) {
            return Ok(false);
        }
        let bytes = n as u64;
        let mut b = self.stream.launch_builder(&self.k.copy_from_host);
        b.arg(&dst).arg(&from).arg(&bytes);
        // SAFETY: copy_from_host(u8* dst, const u8* src, u64 bytes): `dst` holds n bytes and
        // `from` is the device's address of the n mapped source bytes (the caller's contract),
        // both 16-byte aligned (checked above).
        unsafe { b.launch(kernels::elementwise(n.div_ceil(16))) }.map_err(|e| device_err(op, e))?;
        Ok(true)
    }

    /// Copies `src` to device memory at `dst`, in order on the compute stream, without the host
    /// waiting: `src` goes into a page-locked staging buffer of the upload ring, and the
    /// `copy_from_host` kernel reads it from there over PCIe ([`Inner::copy_from_mapped_host`]),
    /// not a copy engine (see the module header).
    ///
    /// # Safety
    /// `dst` must address at least `src.len()` writable bytes, 16-byte aligned, allocated until
    /// the compute stream has run the copy.
    pub(crate) unsafe fn upload_bytes(
        &self,
        op: &'static str,
        dst: CUdeviceptr,
        src: &[u8],
    ) -> Result<()> {
        // SAFETY: the caller's contract, for `src.len()` bytes.
        unsafe { self.upload_filled(op, dst, src.len(), |staged| staged.copy_from_slice(src)) }
    }

    /// [`Inner::upload_bytes`] of `n` bytes that `fill` writes into the staging buffer (all
    /// `n` of them), so a caller with its bytes in pieces copies them once.
    ///
    /// # Safety
    /// As [`Inner::upload_bytes`], for `n` bytes.
    pub(crate) unsafe fn upload_filled(
        &self,
        op: &'static str,
        dst: CUdeviceptr,
        n: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut slot = self.take_upload_slot(op)?;
        let r = (|| {
            if slot.recorded {
                // The slot's previous copy, UPLOAD_RING uploads ago: done in all but name.
                slot.done.synchronize().map_err(|e| device_err(op, e))?;
            }
            let words = n.div_ceil(4);
            if slot.buf.len() < words {
                let mut grown = None;
                staging(self, op, &mut grown, words)?;
                slot.buf = grown.ok_or_else(|| device_err(op, "staging buffer"))?;
                slot.mapped = mapped_address(&slot.buf);
            }
            let host = slot.buf.as_mut_slice().map_err(|e| device_err(op, e))?;
            // SAFETY: the staging words are page-locked memory owned by the slot; any bytes
            // are a valid f32, so writing them through a byte view is sound.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(host.as_mut_ptr().cast::<u8>(), host.len() * 4)
            };
            fill(&mut bytes[..n]);
            let staged = &bytes[..n];
            let mapped = slot.mapped;
            let copy = |s: &CudaStream| {
                if let Some(from) = mapped {
                    // SAFETY: `dst` holds n bytes (the caller's contract); `from` is the device's
                    // address of the slot's staging, n bytes of which were filled above, neither
                    // written nor freed before the slot's event, recorded below, has passed (the
                    // ring synchronises on it before the slot's next use).
                    if unsafe { self.copy_from_device_view(op, dst, from, n) }? {
                        return Ok(());
                    }
                }
                // SAFETY: as above; the staging is page-locked, so the copy is asynchronous.
                unsafe { cudarc::driver::result::memcpy_htod_async(dst, staged, s.cu_stream()) }
                    .map_err(|e| device_err(op, e))
            };
            if n >= TIMED_UPLOAD_MIN {
                self.timed_copy_on(&self.stream, op, Dir::H2d, n, copy)?;
            } else {
                copy(&self.stream)?;
                let mut log = self
                    .copies
                    .lock()
                    .map_err(|_| device_err(op, "copy log poisoned"))?;
                log.totals.h2d_small_bytes += n as u64;
            }
            slot.done
                .record(&self.stream)
                .map_err(|e| device_err(op, e))?;
            slot.recorded = true;
            Ok(())
        })();
        if r.is_err() {
            // Nothing may still read the buffer when it goes back.
            self.stream.synchronize().map_err(|e| device_err(op, e))?;
            slot.recorded = false;
        }
        self.put_upload_slot(slot);
        r
    }
}

/// The device's address of mapped page-locked `buf`, `None` when the driver has none for it.
fn mapped_address(buf: &PinnedHostSlice<f32>) -> Option<CUdeviceptr> {
    let host = buf.as_ptr().ok()?;
    let mut from: CUdeviceptr = 0;
    // SAFETY: a query on a host address, which fails unless it lies in page-locked memory mapped
    // for this context's device.
    let r = unsafe {
        cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut from, host.cast_mut().cast(), 0)
    };
    (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(from)
}

impl Inner {
    /// The largest free download staging buffer, if any.
    fn take_download_staging(&self, op: &'static str) -> Result<Option<PinnedHostSlice<f32>>> {
        let mut log = self
            .copies
            .lock()
            .map_err(|_| device_err(op, "copy log poisoned"))?;
        Ok(log.down.pop())
    }

    /// The oldest slot of the upload ring, or a new one while the ring is not full.
    fn take_upload_slot(&self, op: &'static str) -> Result<UploadSlot> {
        let mut log = self
            .copies
            .lock()
            .map_err(|_| device_err(op, "copy log poisoned"))?;
        if log.ups.len() >= UPLOAD_RING
            && let Some(oldest) = log.ups.pop_front()
        {
            return Ok(oldest);
        }
        drop(log);
        let mut fresh = None;
        staging(self, op, &mut fresh, 1)?;
        let buf = fresh.ok_or_else(|| device_err(op, "staging buffer"))?;
        Ok(UploadSlot {
            mapped: mapped_address(&buf),
            buf,
            done: self.ctx.new_event(None).map_err(|e| device_err(op, e))?,
            recorded: false,
        })
    }

    fn put_upload_slot(&self, slot: UploadSlot) {
        if let Ok(mut log) = self.copies.lock() {
            log.ups.push_back(slot);
        }
    }

    /// Puts a download staging buffer back; past [`DOWNLOAD_STAGING_KEPT`] the smallest goes.
    fn put_download_staging(&self, buf: Option<PinnedHostSlice<f32>>) {
        if let (Some(buf), Ok(mut log)) = (buf, self.copies.lock()) {
            log.down.push(buf);
            // Smallest first, so `pop` hands out the largest.
            log.down.sort_by_key(|b| b.len());
            if log.down.len() > DOWNLOAD_STAGING_KEPT {
                log.down.remove(0);
            }
        }
    }
}
