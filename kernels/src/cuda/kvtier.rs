//! The GPU KV tier's data movement (the mechanism; which blocks move is the runtime's policy):
//!
//! - [`CudaBackend::kv_append`]: a layer's new K and V rows, straight from the projection
//!   outputs, into their pool slots (rounded to the pool's dtype on the way).
//! - [`CudaBackend::kv_export_async`]: pool blocks copied to page-locked host memory on the *copy
//!   stream*, so a spill to the host tier overlaps the compute stream: in the pool's dtype (its
//!   bytes as they are, the host tier's normal case) or widened to f32. The returned
//!   [`CopyTicket`] is the only way to know the bytes have landed.
//! - [`CudaBackend::register_host`]: page-locks memory Rust already owns (the host KV arena), so
//!   the copies above run at PCIe speed and straight into the arena slots (no staging copy).
//! - [`CudaBackend::gather_rows_f32`]: f32 rows read by the SMs straight from page-locked host
//!   memory mapped for the device ([`CudaBackend::mapped_device_ptr`]): the hidden states a
//!   recompute needs, and nothing else of their slots. [`CudaBackend::copy_host_pieces_beside`]
//!   copies them with the copy engine instead, on a stream beside the compute stream, one
//!   gather ahead ([`GatheredRows`]).
//! - [`CudaBackend::argmax_device`]: greedy picks on the device, so a decode step moves
//!   `rows × 4` bytes to the host instead of `rows × vocab × 4`.

use std::sync::Arc;

use rayon::prelude::*;

use cudarc::driver::{
    CudaEvent, CudaFunction, CudaModule, CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg,
};

use super::attention::{KvPool, PoolBuf};
use super::transfer::{Dir, PendingDownload, as_bytes};
use super::{CudaBackend, CudaTensor, device_err, kernels};
use crate::{DType, KvBuf, KvSlice, Result, shape_err};

/// The largest piece of an asynchronous pool write ([`CudaBackend::kv_pool_write_blocks_async`]):
/// each piece takes a buffer of the 16-buffer upload staging ring, which grows to it, so the
/// ring holds at most 128 MiB of page-locked memory for them.
const POOL_UPLOAD_PIECE: usize = 8 << 20;

pub(crate) struct KvTierKernels {
    /// `[dtype]`: f32, f16, bf16.
    append: Vec<CudaFunction>,
    export: Vec<CudaFunction>,
    /// 16-bit pool values gathered as they are (f16 and bf16 pools exported in their dtype).
    gather_u16: CudaFunction,
    /// f32 rows read from device-visible addresses (hidden states in mapped host slots).
    rows_f32: CudaFunction,
    argmax: CudaFunction,
}

impl KvTierKernels {
    pub(crate) fn bind(module: &Arc<CudaModule>) -> std::result::Result<Self, String> {
        let load = |name: String| {
            module
                .load_function(&name)
                .map_err(|e| format!("kernel `{name}` missing: {e}"))
        };
        let mut append = Vec::new();
        let mut export = Vec::new();
        for dt in [DType::F32, DType::F16, DType::BF16] {
            append.push(load(format!("kv_append_{}", dt.name()))?);
            export.push(load(format!("kv_export_{}", dt.name()))?);
        }
        Ok(Self {
            append,
            export,
            gather_u16: load("kv_gather_u16".into())?,
            rows_f32: load("gather_rows_f32".into())?,
            argmax: load("argmax_rows".into())?,
        })
    }
}

fn dtype_index(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Rows read on the side stream ([`CudaBackend::copy_host_pieces_beside`]). The compute stream
/// sees them through [`GatheredRows::ready`]; when dropped, the side stream frees them after the
/// compute stream has passed every use enqueued until then.
pub struct GatheredRows {
    x: Option<CudaTensor>,
    done: CudaEvent,
    be: CudaBackend,
}

impl std::fmt::Debug for GatheredRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatheredRows")
    }
}

impl GatheredRows {
    /// Blocks until the rows have been read (their source may change after this).
    pub fn wait_read(&self) -> Result<()> {
        self.done
            .synchronize()
            .map_err(|e| device_err("gathered rows", e))
    }

    /// Orders the compute stream after the read and lends it the rows.
    pub fn ready(&self) -> Result<&CudaTensor> {
        let be = &self.be.inner;
        be.stream
            .wait(&self.done)
            .map_err(|e| device_err("gathered rows", e))?;
        self.x
            .as_ref()
            .ok_or_else(|| device_err("gathered rows", "no rows"))
    }
}

impl Drop for GatheredRows {
    fn drop(&mut self) {
        let be = &self.be.inner;
        // The side stream frees the rows: not before the compute stream's uses so far. If the
        // event cannot be made, wait here instead.
        match be.stream.record_event(None) {
            Ok(used) if be.side.wait(&used).is_ok() => {}
            _ => {
                let _ = be.stream.synchronize();
            }
        }
        drop(self.x.take());
    }
}

/// A copy in flight on the spill stream. Its destination must not be read (or freed) before
/// [`CopyTicket::wait`] returns; dropping the ticket waits too.
pub struct CopyTicket {
    done: Option<CudaEvent>,
    /// The device staging buffer the copy reads (raw bytes, allocated as f32 words); freed only
    /// after the copy is done.
    staging: Option<CudaSlice<f32>>,
    bytes: usize,
}

impl std::fmt::Debug for CopyTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CopyTicket({} bytes)", self.bytes)
    }
}

impl CopyTicket {
    /// Bytes this copy moves.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Blocks until the copy has landed; returns its error, if any.
    pub fn wait(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let r = match self.done.take() {
            Some(e) => e.synchronize().map_err(|e| device_err("copy", e)),
            None => Ok(()),
        };
        match r {
            // The copies have landed: the staging buffer can return to the pool.
            Ok(()) => self.staging = None,
            // Unknown whether the copies still run: keep the buffer rather than free it under
            // them (the context is unusable after such a failure anyway).
            Err(_) => std::mem::forget(self.staging.take()),
        }
        r
    }
}

impl Drop for CopyTicket {
    fn drop(&mut self) {
        // The destination may be freed right after: never leave a copy writing into it.
        let _ = self.finish();
    }
}

/// Host memory page-locked for the GPU while this lives.
pub struct HostRegistration {
    ptr: usize,
    ctx: Arc<cudarc::driver::CudaContext>,
}

impl std::fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostRegistration({:#x})", self.ptr)
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` was registered by `register_host` and is unregistered once, here.
        let _ = unsafe { cudarc::driver::sys::cuMemHostUnregister(self.ptr as *mut _) };
    }
}

impl CudaBackend {
    /// Copies `blocks` (each one whole block, in the pool's dtype) into pool blocks
    /// `first_block ..`, in order on the compute stream, without the host waiting for the
    /// device: host threads copy them into buffers of the upload staging ring, pieces of at most
    /// [`POOL_UPLOAD_PIECE`] bytes, once, and the slices may be dropped on return. Blocks read
    /// from disk for the next attention come this way, so the host goes on to the next GPU
    /// batch while they copy ([`CudaBackend::kv_pool_write_kv`] waits for the stream). Blocks
    /// in another dtype are rounded to the pool's on the way.
    pub fn kv_pool_write_blocks_async(
        &self,
        pool: &mut KvPool,
        first_block: usize,
        blocks: &[KvSlice<'_>],
    ) -> Result<()> {
        let be = &self.inner;
        let op = "kv_pool_write_blocks_async";
        be.check(op)?;
        let per = pool.shape().block_elems();
        if first_block + blocks.len() > pool.n_blocks() {
            return Err(shape_err(
                op,
                format!(
                    "blocks {first_block}..{} past the pool's {}",
                    first_block + blocks.len(),
                    pool.n_blocks()
                ),
            ));
        }
        if let Some(b) = blocks.iter().find(|b| b.len() != per) {
            return Err(shape_err(
                op,
                format!("a block of {} values, not {per}", b.len()),
            ));
        }
        // Blocks in another dtype than the pool's (an f32 host tier) are rounded to it first.
        let rounded: Vec<Option<KvBuf>> = blocks
            .iter()
            .map(|b| {
                (b.dtype() != pool.dtype()).then(|| {
                    let mut r = KvBuf::with_capacity(pool.dtype(), per);
                    r.extend_from(*b);
                    r
                })
            })
            .collect();
        let blocks: Vec<KvSlice<'_>> = blocks
            .iter()
            .zip(&rounded)
            .map(|(b, r)| r.as_ref().map_or(*b, KvBuf::as_slice))
            .collect();
        let block_bytes = per * pool.dtype().size_bytes();
        // Pieces start on block boundaries, which the staged copy needs 16-byte aligned.
        if !block_bytes.is_multiple_of(16) {
            for (i, b) in blocks.iter().enumerate() {
                self.kv_pool_write_kv(pool, first_block + i, *b)?;
            }
            return Ok(());
        }
        let per_piece = (POOL_UPLOAD_PIECE / block_bytes).max(1);
        let (base, _sync) = match &mut pool.data {
            PoolBuf::F32(d) => d.device_ptr_mut(&be.stream),
            PoolBuf::F16(d) => d.device_ptr_mut(&be.stream),
            PoolBuf::BF16(d) => d.device_ptr_mut(&be.stream),
        };
        for (i, piece) in blocks.chunks(per_piece).enumerate() {
            let dst = base + ((first_block + i * per_piece) * block_bytes) as u64;
            let fill = |staged: &mut [u8]| {
                staged
                    .par_chunks_mut(block_bytes)
                    .zip(piece.par_iter())
                    .for_each(|(to, b)| {
                        to.copy_from_slice(match b {
                            KvSlice::F32(h) => as_bytes(h),
                            KvSlice::F16(h) => as_bytes(h),
                            KvSlice::BF16(h) => as_bytes(h),
                        })
                    });
            };
            // SAFETY: `dst .. dst + piece.len() * block_bytes` lies inside the pool's allocation
            // (checked above), 16-byte aligned (so are the pool and every block, checked); the pool
            // outlives the compute stream's copies (it is freed on that stream).
            unsafe { be.upload_filled(op, dst, piece.len() * block_bytes, fill) }?;
        }
        Ok(())
    }

    /// Writes row `r` of `k`, `v: [rows, kv_heads * head_dim] f32` into `pool` at slot
    /// `slots[r]` (= block × block_tokens + offset).
    pub fn kv_append(
        &self,
        pool: &mut KvPool,
        k: &CudaTensor,
        v: &CudaTensor,
        slots: &[u32],
    ) -> Result<()> {
        let be = &self.inner;
        let op = "kv_append";
        let shape = pool.shape();
        let width = shape.kv_heads * shape.head_dim;
        for (what, t) in [("k", k), ("v", v)] {
            if (t.rows, t.cols) != (slots.len(), width) {
                return Err(shape_err(
                    op,
                    format!(
                        "{what} is [{}, {}], expected [{}, {width}]",
                        t.rows,
                        t.cols,
                        slots.len()
                    ),
                ));
            }
        }
        let capacity = pool.n_blocks() * shape.block_tokens;
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= capacity) {
            return Err(shape_err(
                op,
                format!("slot {bad} is past the pool's {capacity} token slots"),
            ));
        }
        if slots.is_empty() {
            return Ok(());
        }
        let (kb, vb) = (be.buf(op, k)?, be.buf(op, v)?);
        let slots_d = be.upload(op, slots)?;
        let f = &be.kvt.append[dtype_index(pool.dtype())];
        let (rows, kvh, hd, bt) = (
            slots.len() as u64,
            shape.kv_heads as u32,
            shape.head_dim as u32,
            shape.block_tokens as u32,
        );
        let mut l = be.stream.launch_builder(f);
        match &mut pool.data {
            PoolBuf::F32(d) => l.arg(d),
            PoolBuf::F16(d) => l.arg(d),
            PoolBuf::BF16(d) => l.arg(d),
        };
        l.arg(kb)
            .arg(vb)
            .arg(&slots_d)
            .arg(&rows)
            .arg(&kvh)
            .arg(&hd)
            .arg(&bt);
        // SAFETY: kv_append_T(T* pool, const float* k, const float* v, const u32* slots, u64 rows,
        // u32 kv_heads, u32 head_dim, u32 bt): k and v hold rows × kv_heads × head_dim values,
        // every slot is inside the pool (checked above).
        unsafe { l.launch(kernels::elementwise(slots.len() * width)) }
            .map_err(|e| device_err(op, e))?;
        Ok(())
    }

    /// A `[rows.len(), width]` tensor whose row `r` is the `width` f32 values at device address
    /// `rows[r]`, read on the compute stream (after the work enqueued before it).
    ///
    /// # Safety
    /// Each `rows[r] .. rows[r] + 4 × width` must be readable by the device (device memory, or
    /// page-locked host memory mapped for it: [`CudaBackend::mapped_device_ptr`]), 4-byte
    /// aligned, and stay alive and unwritten until the compute stream has run the gather.
    pub unsafe fn gather_rows_f32(&self, rows: &[u64], width: usize) -> Result<CudaTensor> {
        let be = &self.inner;
        let op = "gather_rows_f32";
        be.check(op)?;
        if let Some(&bad) = rows.iter().find(|&&a| a == 0 || a % 4 != 0) {
            return Err(shape_err(
                op,
                format!("row address {bad:#x} is not an f32 address"),
            ));
        }
        let n = rows.len() * width;
        let mut out = be.output(op, n)?;
        if n > 0 {
            let rows_d = be.upload(op, rows)?;
            let (count, width64) = (rows.len() as u64, width as u64);
            let vec4 = u32::from(width.is_multiple_of(4) && rows.iter().all(|a| a % 16 == 0));
            let mut l = be.stream.launch_builder(&be.kvt.rows_f32);
            l.arg(&mut out)
                .arg(&rows_d)
                .arg(&count)
                .arg(&width64)
                .arg(&vec4);
            let threads = if vec4 == 1 { n / 4 } else { n };
            // SAFETY: gather_rows_f32(float* out, const u64* rows_at, u64 rows, u64 width,
            // u32 vec4): `out` holds rows × width values (16-byte aligned, as every allocation);
            // each row address is readable for width values (the caller's contract), and 16-byte
            // aligned with width a multiple of 4 when vec4 is set.
            unsafe { l.launch(kernels::elementwise(threads)) }.map_err(|e| device_err(op, e))?;
        }
        Ok(super::Inner::tensor(rows.len(), width, out))
    }

    /// Copies pieces of host memory into a new `[rows, width]` f32 tensor on the side stream,
    /// with the copy engine (one 2D copy per run), so the read runs beside whatever the compute
    /// stream is doing: `runs[i] = (address, pitch, pieces)` is `pieces` pieces of
    /// `piece_rows × width` f32 values, each `pitch` bytes after the one before (hidden states
    /// of full blocks in host slots, a slot apart), landing one after another. The rows reach
    /// the compute stream only through [`GatheredRows::ready`].
    ///
    /// # Safety
    /// Every piece must be readable host memory, page-locked within one registration (a copy
    /// spanning two registrations fails), that stays alive and unwritten until
    /// [`GatheredRows::wait_read`] returns (or the compute stream has passed a mark recorded
    /// after [`GatheredRows::ready`]).
    pub unsafe fn copy_host_pieces_beside(
        &self,
        runs: &[(*const u8, usize, usize)],
        piece_rows: usize,
        width: usize,
    ) -> Result<GatheredRows> {
        use cudarc::driver::sys;
        let be = &self.inner;
        let op = "copy_host_pieces_beside";
        be.check(op)?;
        let piece_bytes = piece_rows * width * 4;
        if let Some(r) = runs.iter().find(|r| r.2 > 1 && r.1 < piece_bytes) {
            return Err(shape_err(
                op,
                format!("pieces of {piece_bytes} bytes {} bytes apart overlap", r.1),
            ));
        }
        let pieces: usize = runs.iter().map(|r| r.2).sum();
        let n = pieces * piece_rows * width;
        let mut out = be.output_on(&be.side, op, n)?;
        {
            let (base, _sync) = out.device_ptr_mut(&be.side);
            let mut at = 0u64;
            for &(src, pitch, count) in runs.iter().filter(|r| r.2 > 0) {
                let copy = sys::CUDA_MEMCPY2D_st {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
                    srcHost: src.cast(),
                    srcDevice: 0,
                    srcArray: std::ptr::null_mut(),
                    srcPitch: pitch.max(piece_bytes),
                    dstXInBytes: 0,
                    dstY: 0,
                    dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    dstHost: std::ptr::null_mut(),
                    dstDevice: base + at,
                    dstArray: std::ptr::null_mut(),
                    dstPitch: piece_bytes,
                    WidthInBytes: piece_bytes,
                    Height: count,
                };
                // SAFETY: the destination is `count` pieces inside `out` (n values, allocated on
                // the side stream, where the copy runs); the source pieces are page-locked host
                // memory that stays unwritten until the read is done (the caller's contract).
                unsafe { sys::cuMemcpy2DAsync_v2(&copy, be.side.cu_stream()) }
                    .result()
                    .map_err(|e| device_err(op, e))?;
                at += (count * piece_bytes) as u64;
            }
        }
        let done = be.side.record_event(None).map_err(|e| device_err(op, e))?;
        Ok(GatheredRows {
            x: Some(super::Inner::tensor(pieces * piece_rows, width, out)),
            done,
            be: self.clone(),
        })
    }

    /// The device's address of `host`, a byte of page-locked host memory mapped for this
    /// context's device ([`CudaBackend::register_host`] maps it), or `None` where it is not.
    pub fn mapped_device_ptr(&self, host: *const u8) -> Option<u64> {
        self.inner.ctx.bind_to_thread().ok()?;
        self.inner.mapped_device_ptr(host)
    }

    /// Page-locks `len` bytes at `ptr` for fast, asynchronous copies.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must be memory this process owns and keeps mapped for as long as the
    /// returned registration lives.
    pub unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<HostRegistration> {
        let be = &self.inner;
        be.ctx
            .bind_to_thread()
            .map_err(|e| device_err("register_host", e))?;
        // SAFETY: the caller guarantees the range is owned and stays mapped. Not write-combined
        // (the CPU reads this memory); mapped for the device, so kernels can read it in place.
        let flags = cudarc::driver::sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        unsafe { cudarc::driver::sys::cuMemHostRegister_v2(ptr.cast(), len, flags) }
            .result()
            .map_err(|e| device_err("register_host", e))?;
        Ok(HostRegistration {
            ptr: ptr as usize,
            ctx: be.ctx.clone(),
        })
    }

    /// Starts copying pool blocks `ids[i]` to host memory `dst[i]`, each block's
    /// `block_elems` values in dtype `to` (at least `block_elems × to.size_bytes()` bytes at
    /// each `dst[i]`): `to` is the pool's dtype (its bytes, copied as they are) or f32 (widened,
    /// exactly). A kernel on the compute stream gathers the blocks into a staging buffer (so it
    /// sees every append enqueued before it, and later appends into these blocks come after
    /// it); the copies to the host run on the spill stream.
    ///
    /// # Safety
    /// Every `dst[i]` must stay valid, and must not be read or written by anyone else, until the
    /// returned ticket has been waited on or dropped. Page-locked memory (see
    /// [`CudaBackend::register_host`]) makes the copy asynchronous; other memory works, slowly.
    pub unsafe fn kv_export_async(
        &self,
        pool: &KvPool,
        ids: &[u32],
        dst: &[*mut u8],
        to: DType,
    ) -> Result<CopyTicket> {
        let be = &self.inner;
        let op = "kv_export";
        be.check(op)?;
        if ids.len() != dst.len() {
            return Err(shape_err(
                op,
                format!("{} blocks but {} destinations", ids.len(), dst.len()),
            ));
        }
        if to != pool.dtype() && to != DType::F32 {
            return Err(shape_err(
                op,
                format!(
                    "a {} pool exports as {} or f32, not {}",
                    pool.dtype().name(),
                    pool.dtype().name(),
                    to.name()
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&b| b as usize >= pool.n_blocks()) {
            return Err(shape_err(
                op,
                format!("block {bad} is past the pool's {}", pool.n_blocks()),
            ));
        }
        let per = pool.shape().block_elems();
        let block_bytes = per * to.size_bytes();
        if ids.is_empty() {
            return Ok(CopyTicket {
                done: None,
                staging: None,
                bytes: 0,
            });
        }
        let total = ids.len() * block_bytes;
        let staging = self.gather_blocks(op, pool, ids, to)?;
        let exported = be
            .stream
            .record_event(None)
            .map_err(|e| device_err(op, e))?;
        be.spill.wait(&exported).map_err(|e| device_err(op, e))?;
        be.timed_copy_on(&be.spill, op, Dir::D2h, total, |copy| {
            let (base, _sync) = staging.device_ptr(copy);
            for (i, &d) in dst.iter().enumerate() {
                // SAFETY: the caller keeps `d` valid and untouched for `block_bytes` bytes until
                // the ticket is done; the source is block i of `staging`, alive until then too
                // (the ticket owns it), and written by the export kernel the spill stream waited
                // for.
                let host = unsafe { std::slice::from_raw_parts_mut(d, block_bytes) };
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_async(
                        host,
                        base + (i * block_bytes) as u64,
                        copy.cu_stream(),
                    )
                }
                .map_err(|e| device_err(op, e))?;
            }
            Ok(())
        })?;
        // The compute stream does not wait for the copies (they overlap its work); the staging
        // buffer goes back to the pool only once the host has seen them land (`finish`).
        let done = be.spill.record_event(None).map_err(|e| device_err(op, e))?;
        Ok(CopyTicket {
            done: Some(done),
            staging: Some(staging),
            bytes: total,
        })
    }

    /// Starts copying pool blocks `ids` as they are (in the pool's dtype) into one page-locked
    /// host buffer: a kernel on the compute stream gathers them (it sees every append enqueued
    /// before it, and later writes into these blocks come after it), and one copy on the spill
    /// stream brings them down. [`CudaBackend::wait_download_bytes`] hands over the bytes, block
    /// `i` at `i × block bytes`. Unlike [`CudaBackend::kv_export_async`] the blocks' final host
    /// memory needs no page-locking (which costs about as much as the copy itself, the first
    /// time a page is used): the caller copies them there.
    pub fn kv_blocks_download_async(&self, pool: &KvPool, ids: &[u32]) -> Result<PendingDownload> {
        let be = &self.inner;
        let op = "kv_blocks_download";
        be.check(op)?;
        if let Some(&bad) = ids.iter().find(|&&b| b as usize >= pool.n_blocks()) {
            return Err(shape_err(
                op,
                format!("block {bad} is past the pool's {}", pool.n_blocks()),
            ));
        }
        let total = ids.len() * pool.shape().block_elems() * pool.dtype().size_bytes();
        let words = total.div_ceil(4);
        let gathered = if ids.is_empty() {
            be.output(op, 1)?
        } else {
            self.gather_blocks(op, pool, ids, pool.dtype())?
        };
        self.download_owned_on_spill(op, gathered, words)
    }

    /// The first `words` words of `src`, which nothing else owns, down on the spill stream after
    /// the compute stream's work so far; the download owns `src` until its copy has landed.
    fn download_owned_on_spill(
        &self,
        op: &'static str,
        src: CudaSlice<f32>,
        words: usize,
    ) -> Result<PendingDownload> {
        let be = &self.inner;
        let mut p = be.download_words_on(&be.spill, op, &src, words)?;
        p.device = Some(src);
        Ok(p)
    }

    /// Starts copying `t`, which the caller gives up, into a page-locked host buffer on the
    /// spill stream, after the compute stream's work so far (the kernel that made it): for
    /// bulk values bound for host slots beside [`CudaBackend::kv_blocks_download_async`]'s blocks
    /// (a prompt pass's hidden states), without holding up the small-transfer stream. The
    /// download owns `t` until the copy has landed.
    pub fn download_tensor_async(&self, t: CudaTensor) -> Result<PendingDownload> {
        let op = "download_tensor";
        let words = t.rows * t.cols;
        self.inner.buf(op, &t)?;
        let src = t
            .data
            .ok_or_else(|| device_err(op, "tensor has no storage"))?;
        self.download_owned_on_spill(op, src, words)
    }

    /// A new device buffer holding pool blocks `ids` (non-empty, checked to be inside the pool)
    /// end to end in dtype `to` (the pool's, copied as they are, or f32), gathered by a kernel
    /// on the compute stream; allocated as f32 words.
    fn gather_blocks(
        &self,
        op: &'static str,
        pool: &KvPool,
        ids: &[u32],
        to: DType,
    ) -> Result<CudaSlice<f32>> {
        let be = &self.inner;
        let per = pool.shape().block_elems();
        let mut out = be.output(op, (ids.len() * per * to.size_bytes()).div_ceil(4))?;
        let ids_d = be.upload(op, ids)?;
        let (n, per64) = (ids.len() as u64, per as u64);
        let kernel = match (pool.dtype(), to) {
            (DType::F16 | DType::BF16, DType::F16 | DType::BF16) => &be.kvt.gather_u16,
            (from, _) => &be.kvt.export[dtype_index(from)],
        };
        let mut l = be.stream.launch_builder(kernel);
        l.arg(&mut out);
        match &pool.data {
            PoolBuf::F32(d) => l.arg(d),
            PoolBuf::F16(d) => l.arg(d),
            PoolBuf::BF16(d) => l.arg(d),
        };
        l.arg(&ids_d).arg(&n).arg(&per64);
        // SAFETY: kv_export_T(float* out, const T* pool, const u32* ids, u64 n, u64 block_elems)
        // and kv_gather_u16(u16* out, const u16* pool, ...) (chosen above for a 16-bit pool
        // gathered as is, so the pointer types match the data): `out` holds n × block_elems
        // values of the output dtype (rounded up to whole f32 words) and every id is inside the
        // pool (the callers check).
        unsafe { l.launch(kernels::elementwise(ids.len() * per)) }
            .map_err(|e| device_err(op, e))?;
        Ok(out)
    }

    /// The index of the largest value of each row of `x` (the first on ties; NaN never wins).
    pub fn argmax_device(&self, x: &CudaTensor) -> Result<Vec<u32>> {
        let be = &self.inner;
        let op = "argmax_rows";
        let xb = be.buf(op, x)?;
        if x.rows == 0 {
            return Ok(Vec::new());
        }
        if x.cols == 0 {
            return Ok(vec![0; x.rows]);
        }
        super::Inner::rows_fit(op, x.rows)?;
        // SAFETY: every one of the `rows` values is written by the kernel below.
        let mut out = unsafe { be.stream.alloc::<u32>(x.rows) }.map_err(|e| device_err(op, e))?;
        let cols = x.cols as u64;
        let mut l = be.stream.launch_builder(&be.kvt.argmax);
        l.arg(&mut out).arg(xb).arg(&cols);
        // SAFETY: argmax_rows(u32* out, const float* x, u64 cols): one block per row of x, of
        // the ARGMAX_THREADS threads its launch bounds allow.
        unsafe { l.launch(kernels::argmax_per_row(x.rows)) }.map_err(|e| device_err(op, e))?;
        be.stream.clone_dtoh(&out).map_err(|e| device_err(op, e))
    }
}
