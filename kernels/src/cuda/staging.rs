//! Weights streamed from page-locked host memory: when a model's layers do not all fit on the GPU,
//! each layer is staged once in host memory ([`CudaBackend::pin_weight`]) and copied to the device
//! for every forward pass on the *copy stream*, so layer `i + 1` arrives while layer `i` computes
//! (two layers' buffers on the device: double buffering).
//!
//! Ordering, all by events (the backend's buffers carry none):
//! 1. [`CudaBackend::fetch_weight`] allocates the device buffer on the compute stream and makes the
//!    copy stream wait for that point (the memory may have been freed by work still queued there),
//!    then enqueues the copy.
//! 2. [`CudaBackend::fetched`] marks everything enqueued on the copy stream so far.
//! 3. [`CudaBackend::wait_fetched`] makes the compute stream wait for that mark: called right
//!    before the first kernel that reads the weights, so the copy overlaps the kernels before it.

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DeviceRepr};

use super::kvtier::HostRegistration;
use super::transfer::Dir;
use super::{CudaBackend, CudaWeight, WeightBuf, device_err};
use crate::{HostWeight, Result, WeightData};

/// A weight staged in page-locked host memory, in the dtype it has on the device (vectors
/// widened to f32, as [`crate::Backend::upload_weight`] does).
pub struct PinnedWeight {
    /// Declared before `weight`: fields drop in order, so the memory is unregistered before it
    /// is freed.
    _registration: Option<HostRegistration>,
    weight: HostWeight,
}

impl std::fmt::Debug for PinnedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.weight;
        write!(
            f,
            "PinnedWeight[{}, {}] {}",
            w.rows,
            w.cols,
            w.data.dtype().name()
        )
    }
}

impl PinnedWeight {
    pub fn bytes(&self) -> usize {
        self.weight.size_bytes()
    }

    /// The staged values, for host threads that compute with them where they are (page-locked
    /// memory is ordinary cached memory to the CPU).
    pub fn host(&self) -> &HostWeight {
        &self.weight
    }

    /// The staged values as bytes, to refill in place (weights read from disk for every pass).
    /// The buffer neither moves nor changes length, so its registration stays valid; the caller
    /// refills it only after [`CudaBackend::wait_fetched_host`] on the mark of its last fetch.
    pub fn host_bytes_mut(&mut self) -> &mut [u8] {
        self.weight.data.as_bytes_mut()
    }
}

/// Marks copies enqueued on the copy stream (see the module header).
pub struct Fetched(CudaEvent);

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetched")
    }
}

impl CudaBackend {
    /// Stages `w` in page-locked host memory for repeated fetches.
    pub fn pin_weight(&self, w: HostWeight) -> Result<PinnedWeight> {
        let is_vector = w.rows == 1 || w.cols == 1;
        let data = match w.data {
            WeightData::F32(v) => WeightData::F32(v),
            other if is_vector => WeightData::F32(other.to_f32_vec()),
            other => other,
        };
        let (ptr, bytes) = match &data {
            WeightData::F32(v) => (v.as_ptr().cast::<u8>(), v.len() * 4),
            WeightData::F16(v) => (v.as_ptr().cast::<u8>(), v.len() * 2),
            WeightData::BF16(v) => (v.as_ptr().cast::<u8>(), v.len() * 2),
        };
        let registration = if bytes == 0 {
            None
        } else {
            // SAFETY: the vector's heap buffer moves (without reallocating: it is never
            // mutated) into the returned PinnedWeight, which drops the registration first.
            Some(unsafe { self.register_host(ptr.cast_mut(), bytes) }?)
        };
        Ok(PinnedWeight {
            weight: HostWeight::new(w.rows, w.cols, data)?,
            _registration: registration,
        })
    }

    /// Starts copying a staged weight to a new device buffer on the copy stream. The buffer may
    /// be used by the compute stream only after [`CudaBackend::wait_fetched`] on a later
    /// [`CudaBackend::fetched`] mark.
    pub fn fetch_weight(&self, w: &PinnedWeight) -> Result<CudaWeight> {
        let be = &self.inner;
        let op = "fetch_weight";
        be.check(op)?;
        let w = &w.weight;
        let data = match &w.data {
            WeightData::F32(v) => WeightBuf::F32(self.copy_in(op, v)?),
            WeightData::F16(v) => WeightBuf::F16(self.copy_in(op, v)?),
            WeightData::BF16(v) => WeightBuf::BF16(self.copy_in(op, v)?),
        };
        be.note_matrix_weight(&data);
        Ok(CudaWeight {
            rows: w.rows,
            cols: w.cols,
            data,
        })
    }

    fn copy_in<T: DeviceRepr>(&self, op: &'static str, host: &[T]) -> Result<CudaSlice<T>> {
        let be = &self.inner;
        // SAFETY: the whole buffer is written by the copy below before any kernel reads it
        // (the compute stream waits for it through `wait_fetched`).
        let buf =
            unsafe { be.stream.alloc::<T>(host.len().max(1)) }.map_err(|e| device_err(op, e))?;
        if host.is_empty() {
            return Ok(buf);
        }
        let allocated = be
            .stream
            .record_event(None)
            .map_err(|e| device_err(op, e))?;
        be.copy.wait(&allocated).map_err(|e| device_err(op, e))?;
        be.timed_copy(op, Dir::H2d, std::mem::size_of_val(host), |copy| {
            let (dst, _sync) = buf.device_ptr(copy);
            // SAFETY: `dst` holds host.len() elements of T; `host` is page-locked memory owned by
            // a PinnedWeight that the caller keeps alive for the whole run (the Transformer owns
            // it), so it outlives the asynchronous copy.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, copy.cu_stream()) }
                .map_err(|e| device_err(op, e))
        })?;
        Ok(buf)
    }

    /// Marks every copy enqueued by [`CudaBackend::fetch_weight`] so far.
    pub fn fetched(&self) -> Result<Fetched> {
        let be = &self.inner;
        be.copy
            .record_event(None)
            .map(Fetched)
            .map_err(|e| device_err("fetched", e))
    }

    /// Blocks this thread until the copies behind `mark` are done, so their staged sources may
    /// be refilled.
    pub fn wait_fetched_host(&self, mark: &Fetched) -> Result<()> {
        mark.0
            .synchronize()
            .map_err(|e| device_err("wait_fetched_host", e))
    }

    /// Makes the compute stream wait for the copies behind `mark`.
    pub fn wait_fetched(&self, mark: &Fetched) -> Result<()> {
        self.inner
            .stream
            .wait(&mark.0)
            .map_err(|e| device_err("wait_fetched", e))
    }
}
