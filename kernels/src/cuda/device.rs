//! Finding a usable GPU without ever panicking.
//!
//! cudarc loads `libcuda`, `libnvrtc` and `libcublas` with `dlopen` the first time they are used
//! and panics when one is missing, so every entry point here first checks that the library loads
//! (`is_culib_present`), then runs the CUDA calls under `catch_unwind` as a last line of defence
//! (a library that loads but lacks a symbol cudarc expects also panics). The outcome is a
//! [`DeviceInfo`] or a [`CudaUnavailable`] saying why, in words a user can act on.

use std::panic::{AssertUnwindSafe, catch_unwind};

use cudarc::driver::result as drv;
use cudarc::driver::sys::CUdevice_attribute;

/// Why the CUDA backend cannot be used on this machine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("no NVIDIA driver found (libcuda.so not loadable)")]
    NoDriver,
    #[error("NVRTC not found (libnvrtc.so not loadable; it ships with the CUDA toolkit)")]
    NoNvrtc,
    #[error("cuBLAS not found (libcublas.so not loadable; it ships with the CUDA toolkit)")]
    NoCublas,
    #[error("the NVIDIA driver did not initialise: {0}")]
    DriverInit(String),
    #[error("no CUDA device")]
    NoDevice,
    #[error("CUDA device {device} requested, but only {count} present")]
    NoSuchDevice { device: usize, count: usize },
    #[error("CUDA device {device}: {detail}")]
    Setup { device: usize, detail: String },
    #[error("CUDA kernels could not be built for device {device}: {detail}")]
    Kernels { device: usize, detail: String },
}

/// One GPU as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_mem_bytes: u64,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// The CUDA version the driver supports, `(major, minor)`.
    pub driver_cuda_version: (i32, i32),
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ma, mi) = self.compute_capability;
        let (dma, dmi) = self.driver_cuda_version;
        write!(
            f,
            "{} (device {}): {:.2} GiB, compute capability {ma}.{mi}, {} SMs, driver CUDA {dma}.{dmi}",
            self.name,
            self.ordinal,
            self.total_mem_bytes as f64 / (1u64 << 30) as f64,
            self.multiprocessors
        )
    }
}

/// Runs `f`, turning a panic inside cudarc into `Err(on_panic(message))`.
pub(crate) fn guard<T>(
    f: impl FnOnce() -> Result<T, CudaUnavailable>,
    on_panic: impl FnOnce(String) -> CudaUnavailable,
) -> Result<T, CudaUnavailable> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(on_panic(panic_message(payload.as_ref()))),
    }
}

/// The text of a panic caught by `catch_unwind`.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic in the CUDA bindings".into())
}

pub(crate) fn driver_present() -> Result<(), CudaUnavailable> {
    // SAFETY: `is_culib_present` only tries to dlopen the library by name and drops the handle;
    // loading libcuda runs no user code beyond the library's own initialisers.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaUnavailable::NoDriver)
    }
}

/// Checks that the driver, NVRTC and cuBLAS libraries all load.
pub(crate) fn libraries_present() -> Result<(), CudaUnavailable> {
    driver_present()?;
    // SAFETY: as above, a dlopen probe of libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaUnavailable::NoNvrtc);
    }
    // SAFETY: as above, a dlopen probe of libcublas.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaUnavailable::NoCublas);
    }
    Ok(())
}

/// Every CUDA device the driver sees. Needs only the driver library; creates no context.
pub fn probe() -> Result<Vec<DeviceInfo>, CudaUnavailable> {
    driver_present()?;
    guard(probe_unguarded, CudaUnavailable::DriverInit)
}

fn probe_unguarded() -> Result<Vec<DeviceInfo>, CudaUnavailable> {
    drv::init().map_err(|e| CudaUnavailable::DriverInit(e.to_string()))?;
    let count = drv::device::get_count().map_err(|e| CudaUnavailable::DriverInit(e.to_string()))?;
    if count <= 0 {
        return Err(CudaUnavailable::NoDevice);
    }
    let driver_cuda_version = driver_version();
    (0..count as usize)
        .map(|ordinal| {
            describe(ordinal, driver_cuda_version).map_err(|e| CudaUnavailable::Setup {
                device: ordinal,
                detail: e.to_string(),
            })
        })
        .collect()
}

fn driver_version() -> (i32, i32) {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int through the pointer, which points at a live local.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        (v / 1000, (v % 1000) / 10)
    } else {
        (0, 0)
    }
}

fn describe(
    ordinal: usize,
    driver_cuda_version: (i32, i32),
) -> Result<DeviceInfo, drv::DriverError> {
    let dev = drv::device::get(ordinal as i32)?;
    let attr = |a| {
        // SAFETY: `dev` is a device handle the driver just returned; reading an attribute has no
        // other precondition.
        unsafe { drv::device::get_attribute(dev, a) }
    };
    Ok(DeviceInfo {
        ordinal,
        name: drv::device::get_name(dev)?,
        // SAFETY: as above, `dev` is a valid device handle.
        total_mem_bytes: unsafe { drv::device::total_mem(dev) }? as u64,
        compute_capability: (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        driver_cuda_version,
    })
}

/// The device `device` once the libraries are present and the driver lists it, or why not.
pub(crate) fn find(device: usize) -> Result<DeviceInfo, CudaUnavailable> {
    libraries_present()?;
    let devices = probe()?;
    devices
        .get(device)
        .cloned()
        .ok_or(CudaUnavailable::NoSuchDevice {
            device,
            count: devices.len(),
        })
}
